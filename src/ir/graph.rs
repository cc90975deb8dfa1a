use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::{DType, IrError, QuantParams, Tensor};

/// One output of one node: `node:index` in TensorFlow's notation (`node` alone means index 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorRef {
    pub node: String,
    pub index: u32,
}

impl TensorRef {
    pub fn new(node: impl Into<String>, index: u32) -> TensorRef {
        TensorRef {
            node: node.into(),
            index,
        }
    }

    /// Parses `name`, `name:3`. A `^name` control input is not a tensor and gives `None`.
    pub fn parse(s: &str) -> Option<TensorRef> {
        if s.starts_with('^') || s.is_empty() {
            return None;
        }
        if let Some((name, idx)) = s.rsplit_once(':') {
            if let Ok(i) = idx.parse::<u32>() {
                return Some(TensorRef::new(name, i));
            }
        }
        Some(TensorRef::new(s, 0))
    }
}

impl fmt::Display for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.index == 0 {
            f.write_str(&self.node)
        } else {
            write!(f, "{}:{}", self.node, self.index)
        }
    }
}

/// A node attribute. Anything the IR does not model is kept as the raw bytes of
/// TensorFlow's `AttrValue` so that a graph round-trips without loss.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Bool(bool),
    Str(Vec<u8>),
    Type(DType),
    /// `None` = unknown rank; a dimension of -1 is unknown.
    Shape(Option<Vec<i64>>),
    Tensor(Tensor),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Bools(Vec<bool>),
    Strs(Vec<Vec<u8>>),
    Types(Vec<DType>),
    Shapes(Vec<Option<Vec<i64>>>),
    Opaque(Vec<u8>),
}

/// A graph node. Names are the durable identity: edges, diagnostics and cache
/// manifests refer to nodes by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub name: String,
    pub op: String,
    pub inputs: Vec<TensorRef>,
    pub control_inputs: Vec<String>,
    pub device: String,
    pub attrs: BTreeMap<String, Attr>,
    /// Quantization of this node's outputs, by output index, once a stage has decided it.
    pub output_quant: BTreeMap<u32, QuantParams>,
}

impl Node {
    pub fn new(name: impl Into<String>, op: impl Into<String>) -> Node {
        Node {
            name: name.into(),
            op: op.into(),
            ..Node::default()
        }
    }

    pub fn with_input(mut self, input: TensorRef) -> Node {
        self.inputs.push(input);
        self
    }

    pub fn with_attr(mut self, key: &str, value: Attr) -> Node {
        self.attrs.insert(key.to_string(), value);
        self
    }

    /// A `Const` node holding `value`.
    pub fn constant(name: impl Into<String>, value: Tensor) -> Node {
        let dtype = value.dtype();
        Node::new(name, "Const")
            .with_attr("dtype", Attr::Type(dtype))
            .with_attr("value", Attr::Tensor(value))
    }

    /// Whether this is a `Const` node.
    pub fn is_const(&self) -> bool {
        self.op == "Const"
    }

    /// The value of a `Const` node.
    pub fn const_value(&self) -> Option<&Tensor> {
        match (self.op.as_str(), self.attrs.get("value")) {
            ("Const", Some(Attr::Tensor(t))) => Some(t),
            _ => None,
        }
    }

    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attrs.get(key)
    }

    fn missing(&self, key: &str, what: &str) -> IrError {
        IrError::new(format!(
            "node '{}' ({}): attribute '{key}' {what}",
            self.name, self.op
        ))
    }

    pub fn attr_int(&self, key: &str) -> Result<i64, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Int(v)) => Ok(*v),
            Some(_) => Err(self.missing(key, "is not an int")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_float(&self, key: &str) -> Result<f32, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Float(v)) => Ok(*v),
            Some(_) => Err(self.missing(key, "is not a float")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_bool(&self, key: &str) -> Result<bool, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Bool(v)) => Ok(*v),
            Some(_) => Err(self.missing(key, "is not a bool")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_str(&self, key: &str) -> Result<&str, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Str(v)) => {
                std::str::from_utf8(v).map_err(|_| self.missing(key, "is not UTF-8"))
            }
            Some(_) => Err(self.missing(key, "is not a string")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_type(&self, key: &str) -> Result<DType, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Type(v)) => Ok(*v),
            Some(_) => Err(self.missing(key, "is not a type")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_ints(&self, key: &str) -> Result<&[i64], IrError> {
        match self.attrs.get(key) {
            Some(Attr::Ints(v)) => Ok(v),
            Some(_) => Err(self.missing(key, "is not a list of ints")),
            None => Err(self.missing(key, "is missing")),
        }
    }

    pub fn attr_tensor(&self, key: &str) -> Result<&Tensor, IrError> {
        match self.attrs.get(key) {
            Some(Attr::Tensor(v)) => Ok(v),
            Some(_) => Err(self.missing(key, "is not a tensor")),
            None => Err(self.missing(key, "is missing")),
        }
    }
}

/// A dataflow graph. Node order carries no meaning beyond determinism; use
/// [`Graph::topo_order`] to evaluate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub nodes: Vec<Node>,
    /// Declared model inputs (placeholder node names), in recipe order.
    pub inputs: Vec<String>,
    /// Declared model outputs.
    pub outputs: Vec<TensorRef>,
    /// GraphDef `versions.producer`, kept so an exported GraphDef says what it came from.
    pub producer: i32,
    /// Serialized `FunctionDefLibrary`, carried through untouched.
    pub library: Vec<u8>,
}

/// The ops of TF1 loop control flow (`tf.while_loop`, `dynamic_rnn`), which qpipe does not support.
pub const LOOP_OPS: &[&str] = &[
    "Merge",
    "RefMerge",
    "NextIteration",
    "RefNextIteration",
    "Switch",
    "RefSwitch",
    "LoopCond",
    "Enter",
    "RefEnter",
    "Exit",
    "RefExit",
];

impl Graph {
    /// Name → position in `nodes`. Duplicate names are an error.
    pub fn index(&self) -> Result<HashMap<&str, usize>, IrError> {
        let mut map = HashMap::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            if map.insert(n.name.as_str(), i).is_some() {
                return Err(IrError::new(format!("duplicate node name '{}'", n.name)));
            }
        }
        Ok(map)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn node_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Positions of each node's data and control predecessors, checking that every
    /// input names an existing node.
    fn predecessors(&self, index: &HashMap<&str, usize>) -> Result<Vec<Vec<usize>>, IrError> {
        self.nodes
            .iter()
            .map(|n| {
                let data = n.inputs.iter().map(|r| r.node.as_str());
                let ctrl = n.control_inputs.iter().map(String::as_str);
                data.chain(ctrl)
                    .map(|name| {
                        index.get(name).copied().ok_or_else(|| {
                            IrError::new(format!(
                                "node '{}' ({}) has input '{name}', which is not in the graph",
                                n.name, n.op
                            ))
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Node positions in an order where every node comes after its inputs (Kahn's
    /// algorithm, iterative, stable with respect to `nodes`). A cycle or a dangling
    /// input is an error naming a node on it.
    pub fn topo_order(&self) -> Result<Vec<usize>, IrError> {
        let index = self.index()?;
        let preds = self.predecessors(&index)?;
        let mut indegree: Vec<usize> = preds.iter().map(Vec::len).collect();
        let mut succs: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, ps) in preds.iter().enumerate() {
            for &p in ps {
                succs[p].push(i);
            }
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> =
            (0..self.nodes.len())
                .filter(|&i| indegree[i] == 0)
                .map(std::cmp::Reverse)
                .collect();
        let mut order = Vec::with_capacity(self.nodes.len());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &s in &succs[i] {
                indegree[s] -= 1;
                if indegree[s] == 0 {
                    ready.push(std::cmp::Reverse(s));
                }
            }
        }
        if order.len() != self.nodes.len() {
            let stuck: Vec<usize> = (0..self.nodes.len()).filter(|&i| indegree[i] > 0).collect();
            return Err(IrError::new(self.cycle_message(&stuck)));
        }
        Ok(order)
    }

    /// Why the nodes `stuck` (those left over by a topological sort) cannot be
    /// ordered: a TF1 while loop when loop control flow is among them (the only
    /// cycles TF allows), else a cycle through the first of them.
    pub fn cycle_message(&self, stuck: &[usize]) -> String {
        let Some(&at) = stuck
            .iter()
            .find(|&&i| LOOP_OPS.contains(&self.nodes[i].op.as_str()))
        else {
            let n = &self.nodes[stuck.first().copied().unwrap_or(0)];
            return format!("the graph has a cycle through node '{}' ({})", n.name, n.op);
        };
        let frame = stuck
            .iter()
            .flat_map(|&i| &self.nodes[i].inputs)
            .filter_map(|r| self.node(&r.node))
            .filter(|n| n.op == "Enter" || n.op == "RefEnter")
            .find_map(|n| n.attr_str("frame_name").ok().map(str::to_string))
            .unwrap_or_else(|| match self.nodes[at].name.rsplit_once('/') {
                Some((scope, _)) => scope.to_string(),
                None => self.nodes[at].name.clone(),
            });
        format!(
            "node '{}' ({}) is part of the TF1 while loop '{frame}': TF1 loop control flow \
             (Enter/Exit/NextIteration/Merge/Switch/LoopCond, as tf.while_loop and \
             tf.nn.dynamic_rnn build it) is not supported; unroll the loop when building the \
             model (tf.keras.layers.RNN(..., unroll=True) or tf.compat.v1.nn.static_rnn) and \
             export it again",
            self.nodes[at].name, self.nodes[at].op
        )
    }

    /// Names of every node that the given roots depend on (data and control), roots included.
    /// Missing roots are an error naming them.
    pub fn reachable_from(&self, roots: &[&str]) -> Result<HashSet<String>, IrError> {
        let index = self.index()?;
        let mut seen = HashSet::new();
        let mut stack: Vec<usize> = Vec::new();
        for r in roots {
            let i = *index
                .get(r)
                .ok_or_else(|| IrError::new(format!("output '{r}' is not a node of the graph")))?;
            stack.push(i);
        }
        while let Some(i) = stack.pop() {
            let n = &self.nodes[i];
            if !seen.insert(n.name.clone()) {
                continue;
            }
            for name in n
                .inputs
                .iter()
                .map(|r| r.node.as_str())
                .chain(n.control_inputs.iter().map(String::as_str))
            {
                let j = *index.get(name).ok_or_else(|| {
                    IrError::new(format!(
                        "node '{}' ({}) has input '{name}', which is not in the graph",
                        n.name, n.op
                    ))
                })?;
                if !seen.contains(name) {
                    stack.push(j);
                }
            }
        }
        Ok(seen)
    }

    /// Keeps only the nodes the declared outputs need, in their original order.
    pub fn prune_to_outputs(&mut self) -> Result<(), IrError> {
        let roots: Vec<&str> = self.outputs.iter().map(|r| r.node.as_str()).collect();
        let keep = self.reachable_from(&roots)?;
        self.nodes.retain(|n| keep.contains(&n.name));
        Ok(())
    }

    /// For each node name, the nodes that read one of its outputs (data edges only).
    pub fn consumers(&self) -> HashMap<String, Vec<usize>> {
        let mut map: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for r in &n.inputs {
                let v = map.entry(r.node.clone()).or_default();
                if v.last() != Some(&i) {
                    v.push(i);
                }
            }
        }
        map
    }

    /// Node count by op, sorted by op name.
    pub fn op_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for n in &self.nodes {
            *h.entry(n.op.clone()).or_insert(0) += 1;
        }
        h
    }
}
