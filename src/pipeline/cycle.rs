//! Finding a cycle in a graph, for the recipe's "stages form a cycle" error.

use std::collections::VecDeque;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

/// Some cycle of `g` as a node sequence (the edge from the last back to the first
/// closes it), if `g` has one.
pub fn find_cycle<N, E>(g: &DiGraph<N, E>) -> Option<Vec<NodeIndex>> {
    for scc in petgraph::algo::tarjan_scc(g) {
        let start = scc[0];
        if scc.len() == 1 && g.find_edge(start, start).is_none() {
            continue;
        }
        if scc.len() == 1 {
            return Some(vec![start]);
        }
        let in_scc = |n: NodeIndex| scc.contains(&n);
        let mut parent: std::collections::HashMap<NodeIndex, NodeIndex> = Default::default();
        let mut queue = VecDeque::from([start]);
        while let Some(n) = queue.pop_front() {
            for m in g.neighbors_directed(n, Direction::Outgoing) {
                if m == start {
                    let mut path = vec![n];
                    let mut cur = n;
                    while cur != start {
                        let Some(&p) = parent.get(&cur) else { break };
                        cur = p;
                        path.push(cur);
                    }
                    path.reverse();
                    return Some(path);
                }
                if in_scc(m) && !parent.contains_key(&m) {
                    parent.insert(m, n);
                    queue.push_back(m);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cycle_in_order() {
        let mut g: DiGraph<&str, ()> = DiGraph::new();
        let a = g.add_node("a");
        let b = g.add_node("b");
        let c = g.add_node("c");
        let d = g.add_node("d");
        g.add_edge(d, a, ());
        g.add_edge(a, b, ());
        g.add_edge(b, c, ());
        g.add_edge(c, a, ());
        let cycle = find_cycle(&g).unwrap();
        let names: Vec<&str> = cycle.iter().map(|&n| g[n]).collect();
        assert_eq!(names.len(), 3);
        for w in 0..3 {
            let (x, y) = (cycle[w], cycle[(w + 1) % 3]);
            assert!(g.find_edge(x, y).is_some(), "{names:?} is not a cycle");
        }
        let mut acyclic: DiGraph<(), ()> = DiGraph::new();
        let x = acyclic.add_node(());
        let y = acyclic.add_node(());
        acyclic.add_edge(x, y, ());
        assert!(find_cycle(&acyclic).is_none());
        let mut selfloop: DiGraph<(), ()> = DiGraph::new();
        let s = selfloop.add_node(());
        selfloop.add_edge(s, s, ());
        assert_eq!(find_cycle(&selfloop), Some(vec![s]));
    }
}
