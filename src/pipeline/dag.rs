//! The stage DAG: order, neighbours, and `qpipe graph` renderings.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::Write;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use super::recipe::Recipe;

/// Stages as nodes (by index into [`Recipe::stages`]), edges upstream → downstream
/// labelled with the config key.
pub struct Dag {
    graph: DiGraph<usize, String>,
    nodes: Vec<NodeIndex>,
}

impl Dag {
    pub fn new(recipe: &Recipe) -> Dag {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..recipe.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, s) in recipe.stages.iter().enumerate() {
            for (key, up) in &s.inputs {
                graph.add_edge(nodes[*up], nodes[i], key.clone());
            }
        }
        Dag { graph, nodes }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Stages that read stage `i` (each once).
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        let mut d: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Stages stage `i` reads (each once).
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut d: Vec<usize> = self
            .graph
            .neighbors_directed(self.nodes[i], Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// A topological order preferring declaration order; `None` if there is a cycle
    /// (which a parsed recipe never has).
    pub fn topo_order(&self) -> Option<Vec<usize>> {
        let n = self.nodes.len();
        let mut indegree: Vec<usize> = (0..n).map(|i| self.upstream(i).len()).collect();
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for d in self.dependents(i) {
                indegree[d] -= 1;
                if indegree[d] == 0 {
                    ready.push(Reverse(d));
                }
            }
        }
        (order.len() == n).then_some(order)
    }

    /// All stages downstream of `i`, transitively.
    pub fn downstream_closure(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut queue = VecDeque::from(self.dependents(i));
        let mut out = Vec::new();
        while let Some(d) = queue.pop_front() {
            if !std::mem::replace(&mut seen[d], true) {
                out.push(d);
                queue.extend(self.dependents(d));
            }
        }
        out.sort_unstable();
        out
    }

    /// `qpipe graph`: one line a stage, in dependency order.
    pub fn render_text(&self, recipe: &Recipe) -> String {
        let order = self
            .topo_order()
            .unwrap_or_else(|| (0..self.len()).collect());
        let w = recipe.stages.iter().map(|s| s.id.len()).max().unwrap_or(0);
        let kw = recipe
            .stages
            .iter()
            .map(|s| s.kind.len())
            .max()
            .unwrap_or(0);
        let mut out = format!("{} ({} stages)\n", recipe.name, recipe.stages.len());
        for i in order {
            let s = &recipe.stages[i];
            let mut line = format!("  {:w$}  {:kw$}", s.id, s.kind);
            let mut parts = Vec::new();
            if !s.inputs.is_empty() {
                let ins: Vec<String> = s
                    .inputs
                    .iter()
                    .map(|(k, up)| format!("{k}={}", recipe.stages[*up].id))
                    .collect();
                parts.push(format!("<- {}", ins.join(", ")));
            }
            if s.deps.model {
                parts.push("reads model".to_string());
            }
            if !s.deps.datasets.is_empty() {
                parts.push(format!("reads datasets {}", s.deps.datasets.join(", ")));
            }
            for (p, _) in &s.outputs {
                parts.push(format!("-> {p}"));
            }
            if !parts.is_empty() {
                line.push_str("  ");
                line.push_str(&parts.join("  "));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// `qpipe graph --dot`: Graphviz, stages as boxes, datasets and outputs as notes.
    pub fn render_dot(&self, recipe: &Recipe) -> String {
        let q = |s: &str| {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("\"{escaped}\"")
        };
        let mut out = String::new();
        let _ = writeln!(out, "digraph {} {{", q(&recipe.name));
        let _ = writeln!(
            out,
            "  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];"
        );
        let order = self
            .topo_order()
            .unwrap_or_else(|| (0..self.len()).collect());
        let mut datasets_used = std::collections::BTreeSet::new();
        for &i in &order {
            let s = &recipe.stages[i];
            let _ = writeln!(
                out,
                "  {} [label={}];",
                q(&s.id),
                q(&format!("{}\n{}", s.id, s.kind))
            );
            if s.deps.model {
                let _ = writeln!(out, "  \"[model]\" -> {};", q(&s.id));
            }
            for d in &s.deps.datasets {
                datasets_used.insert(d.clone());
                let _ = writeln!(out, "  {} -> {};", q(&format!("[datasets.{d}]")), q(&s.id));
            }
            for (p, _) in &s.outputs {
                let _ = writeln!(out, "  {} [shape=note];", q(p));
                let _ = writeln!(out, "  {} -> {};", q(&s.id), q(p));
            }
        }
        for e in self.graph.edge_references() {
            let from = &recipe.stages[self.graph[e.source()]].id;
            let to = &recipe.stages[self.graph[e.target()]].id;
            let _ = writeln!(out, "  {} -> {} [label={}];", q(from), q(to), q(e.weight()));
        }
        if recipe.stages.iter().any(|s| s.deps.model) {
            let _ = writeln!(out, "  \"[model]\" [shape=cylinder];");
        }
        for d in datasets_used {
            let _ = writeln!(out, "  {} [shape=cylinder];", q(&format!("[datasets.{d}]")));
        }
        out.push_str("}\n");
        out
    }
}
