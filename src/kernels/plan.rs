//! Compiling a graph into an execution plan and running it.
//!
//! A plan is the nodes the fetches need, in topological order (ties broken by node
//! position), each resolved to a [`Kernel`] with its inputs as slot numbers. Every
//! value lives in a slot until its last reader takes it, so intermediate buffers are
//! freed as soon as they are dead. Control edges are ignored: the graphs qpipe runs
//! are pure dataflow.

use std::collections::HashMap;

use super::elementwise::UnaryOp;
use super::nn::Act;
use super::ops::Arithmetic;
use super::ops::{shape_attr, Kernel, StepQuant};
use super::value::Value;
use crate::error::{Error, Result};
use crate::ir::{DType, Graph, Tensor, TensorRef};

/// A fed tensor: a placeholder (or any node) whose output 0 the caller provides.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub name: String,
    /// From the placeholder's `dtype` attribute, when it has one.
    pub dtype: Option<DType>,
    /// From its `shape` attribute (-1 = any size).
    pub shape: Option<Vec<i64>>,
    slot: usize,
}

#[derive(Debug, Clone)]
struct Step {
    name: String,
    op: String,
    kernel: Kernel,
    /// (slot, whether this step is the slot's last reader and takes the value).
    inputs: Vec<(usize, bool)>,
    /// Slot for each output index that someone reads.
    outputs: Vec<Option<usize>>,
    quant: StepQuant,
    /// A float matrix step that also runs the `BiasAdd` (its bias the last input) and
    /// activation steps that read only its output (see [`fuse_float_epilogues`]).
    fused: Option<Fused>,
}

#[derive(Debug, Clone, Copy)]
struct Fused {
    bias: bool,
    act: Act,
}

/// A compiled graph, reusable across batches and threads.
#[derive(Debug, Clone)]
pub struct Plan {
    steps: Vec<Step>,
    n_slots: usize,
    inputs: Vec<PlanInput>,
    fetches: Vec<usize>,
    fetch_refs: Vec<TensorRef>,
    /// The most bytes one value has held in the runs so far (see [`Plan::peak_bytes`]).
    peak: Peak,
    /// Last, so that it drops after the steps' constants.
    _consts: ConstRelease,
}

/// A running maximum shared by the threads running a plan.
#[derive(Debug, Default)]
struct Peak(std::sync::atomic::AtomicUsize);

impl Clone for Peak {
    fn clone(&self) -> Peak {
        Peak(self.get().into())
    }
}

impl Peak {
    fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Lets go of this plan's share of large constants (see [`Value::from_const_tensor`]).
#[derive(Debug, Clone, Default)]
struct ConstRelease;

impl Drop for ConstRelease {
    fn drop(&mut self) {
        super::value::prune_shared_consts();
    }
}

impl Plan {
    /// Compiles the part of `graph` that `fetches` need, with `feeds` (node names)
    /// provided at run time.
    pub fn compile(graph: &Graph, feeds: &[&str], fetches: &[TensorRef]) -> Result<Plan> {
        let index = graph.index()?;
        let lookup = |name: &str, what: &str| -> Result<usize> {
            index
                .get(name)
                .copied()
                .ok_or_else(|| Error::msg(format!("{what} '{name}' is not a node of the graph")))
        };
        let mut fed = vec![false; graph.nodes.len()];
        let mut feed_idx = Vec::with_capacity(feeds.len());
        for f in feeds {
            let i = lookup(f, "feed")?;
            if std::mem::replace(&mut fed[i], true) {
                return Err(Error::msg(format!("'{f}' is fed twice")));
            }
            feed_idx.push(i);
        }
        let mut needed = vec![false; graph.nodes.len()];
        let mut stack = Vec::new();
        for r in fetches {
            let i = lookup(&r.node, "fetch")?;
            if fed[i] && r.index != 0 {
                return Err(Error::msg(format!("cannot fetch '{r}' of a fed node")));
            }
            stack.push(i);
        }
        // Producer position of every data input, resolved once.
        let mut producers: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len()];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut needed[i], true) || fed[i] {
                continue;
            }
            let node = &graph.nodes[i];
            for r in &node.inputs {
                let j = index.get(r.node.as_str()).copied().ok_or_else(|| {
                    Error::msg(format!(
                        "node '{}' ({}) has input '{}', which is not in the graph",
                        node.name, node.op, r.node
                    ))
                })?;
                producers[i].push(j);
                if !needed[j] {
                    stack.push(j);
                }
            }
        }
        // Kahn's algorithm over data edges of needed, unfed nodes; ready nodes by position.
        let mut indegree = vec![0usize; graph.nodes.len()];
        let mut succs: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len()];
        for i in 0..graph.nodes.len() {
            if needed[i] && !fed[i] {
                for &j in &producers[i] {
                    if !fed[j] {
                        indegree[i] += 1;
                        succs[j].push(i);
                    }
                }
            }
        }
        let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> =
            (0..graph.nodes.len())
                .filter(|&i| needed[i] && !fed[i] && indegree[i] == 0)
                .map(std::cmp::Reverse)
                .collect();
        let mut order = Vec::new();
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &s in &succs[i] {
                indegree[s] -= 1;
                if indegree[s] == 0 {
                    ready.push(std::cmp::Reverse(s));
                }
            }
        }
        let n_run = (0..graph.nodes.len())
            .filter(|&i| needed[i] && !fed[i])
            .count();
        if order.len() != n_run {
            let stuck: Vec<usize> = (0..graph.nodes.len())
                .filter(|&i| needed[i] && !fed[i] && indegree[i] > 0)
                .collect();
            return Err(Error::msg(graph.cycle_message(&stuck)));
        }

        let mut slot_of: HashMap<(usize, u32), usize> = HashMap::new();
        let mut n_slots = 0usize;
        let mut slot = |key: (usize, u32)| -> usize {
            *slot_of.entry(key).or_insert_with(|| {
                n_slots += 1;
                n_slots - 1
            })
        };
        let inputs: Vec<PlanInput> = feed_idx
            .iter()
            .map(|&i| {
                let n = &graph.nodes[i];
                PlanInput {
                    name: n.name.clone(),
                    dtype: n.attr_type("dtype").ok(),
                    shape: shape_attr(n, "shape"),
                    slot: slot((i, 0)),
                }
            })
            .collect();
        let mut steps = Vec::with_capacity(order.len());
        for &i in &order {
            let node = &graph.nodes[i];
            let kernel = Kernel::compile(node)
                .map_err(|e| e.context(format!("node '{}' ({})", node.name, node.op)))?;
            let in_slots: Vec<(usize, bool)> = node
                .inputs
                .iter()
                .zip(&producers[i])
                .map(|(r, &j)| (slot((j, r.index)), false))
                .collect();
            let quant = StepQuant {
                inputs: node
                    .inputs
                    .iter()
                    .zip(&producers[i])
                    .map(|(r, &j)| graph.nodes[j].output_quant.get(&r.index).cloned())
                    .collect(),
                outputs: Vec::new(),
                arithmetic: Default::default(),
            };
            steps.push(Step {
                name: node.name.clone(),
                op: node.op.clone(),
                kernel,
                inputs: in_slots,
                outputs: Vec::new(),
                quant,
                fused: None,
            });
        }
        let fetch_slots: Vec<usize> = fetches
            .iter()
            .map(|r| slot((index[r.node.as_str()], r.index)))
            .collect();
        // Output slots: only those some step or fetch reads.
        let step_of: HashMap<usize, usize> =
            order.iter().enumerate().map(|(s, &i)| (i, s)).collect();
        for (&(node, port), &s) in &slot_of {
            if let Some(&st) = step_of.get(&node) {
                let outs = &mut steps[st].outputs;
                if outs.len() <= port as usize {
                    outs.resize(port as usize + 1, None);
                }
                outs[port as usize] = Some(s);
            }
        }
        for (st, &i) in order.iter().enumerate() {
            let q = &graph.nodes[i].output_quant;
            let n = steps[st].outputs.len();
            steps[st].quant.outputs = (0..n as u32).map(|p| q.get(&p).cloned()).collect();
        }
        // Before folding: a table only a gather reads stays narrow and is widened
        // per lookup instead of whole.
        gather_before_dequantize(&mut steps, &mut n_slots, &fetch_slots);
        gather_from_tables(&mut steps, &fetch_slots)?;
        fold_constant_casts(&mut steps)?;
        fuse_float_epilogues(&mut steps, &fetch_slots);
        let mut last_use = vec![usize::MAX; n_slots];
        let mut is_fetch = vec![false; n_slots];
        for &f in &fetch_slots {
            is_fetch[f] = true;
        }
        for (st, step) in steps.iter().enumerate() {
            for &(s, _) in &step.inputs {
                last_use[s] = st;
            }
        }
        for (st, step) in steps.iter_mut().enumerate() {
            let n = step.inputs.len();
            for k in 0..n {
                let s = step.inputs[k].0;
                let later = step.inputs[k + 1..].iter().any(|&(t, _)| t == s);
                step.inputs[k].1 = last_use[s] == st && !is_fetch[s] && !later;
            }
        }
        Ok(Plan {
            steps,
            n_slots,
            inputs,
            fetches: fetch_slots,
            fetch_refs: fetches.to_vec(),
            peak: Peak::default(),
            _consts: ConstRelease,
        })
    }

    /// The same plan with its int8 kernels computing as `arithmetic` says
    /// (the reference kernels unless asked).
    pub fn with_arithmetic(mut self, arithmetic: Arithmetic) -> Plan {
        for step in &mut self.steps {
            step.quant.arithmetic = arithmetic;
        }
        self
    }

    /// The fed tensors, in the order [`Plan::run_values`] expects them.
    pub fn inputs(&self) -> &[PlanInput] {
        &self.inputs
    }

    pub fn fetches(&self) -> &[TensorRef] {
        &self.fetch_refs
    }

    /// Number of kernels the plan runs.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The most bytes any value computed by a step has held, over every run so far:
    /// after a run of `r` rows, `peak_bytes() / r` sizes the next batches (see
    /// [`super::dataset::batch_rows`]).
    pub fn peak_bytes(&self) -> usize {
        self.peak.get()
    }

    /// Runs the plan on values given in [`Plan::inputs`] order.
    pub fn run_values(&self, feeds: Vec<Value>) -> Result<Vec<Value>> {
        if feeds.len() != self.inputs.len() {
            return Err(Error::msg(format!(
                "{} feeds given, the plan takes {}",
                feeds.len(),
                self.inputs.len()
            )));
        }
        let mut slots: Vec<Option<Value>> = vec![None; self.n_slots];
        for (inp, v) in self.inputs.iter().zip(feeds) {
            check_feed(inp, &v)?;
            slots[inp.slot] = Some(v);
        }
        let mut peak = 0usize;
        for step in &self.steps {
            let mut args = Vec::with_capacity(step.inputs.len());
            for &(s, take) in &step.inputs {
                let v = if take {
                    slots[s].take()
                } else {
                    slots[s].clone()
                };
                args.push(v.ok_or_else(|| {
                    Error::msg(format!(
                        "node '{}' ({}): an input was not computed",
                        step.name, step.op
                    ))
                })?);
            }
            let outs = match step.fused {
                None => super::exec_kernel(&step.kernel, args, &step.quant),
                Some(f) => run_fused(step, args, f),
            }
            .map_err(|e| e.context(format!("node '{}' ({})", step.name, step.op)))?;
            let n_outs = outs.len();
            for v in &outs {
                peak = peak.max(v.len() * v.dtype().size().unwrap_or(8));
            }
            for (port, v) in outs.into_iter().enumerate() {
                if let Some(Some(s)) = step.outputs.get(port) {
                    slots[*s] = Some(v);
                }
            }
            if step.outputs.len() > n_outs {
                return Err(Error::msg(format!(
                    "node '{}' ({}) has {n_outs} outputs, output {} is read",
                    step.name,
                    step.op,
                    step.outputs.len() - 1
                )));
            }
        }
        self.peak
            .0
            .fetch_max(peak, std::sync::atomic::Ordering::Relaxed);
        self.fetches
            .iter()
            .zip(&self.fetch_refs)
            .map(|(&s, r)| {
                slots[s]
                    .clone()
                    .ok_or_else(|| Error::msg(format!("fetch '{r}' was not computed")))
            })
            .collect()
    }

    /// Runs the plan on named IR tensors (every plan input must be given).
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        let mut vals = Vec::with_capacity(self.inputs.len());
        for inp in &self.inputs {
            let t = feeds
                .iter()
                .find(|(n, _)| *n == inp.name)
                .ok_or_else(|| Error::msg(format!("input '{}' was not fed", inp.name)))?;
            vals.push(Value::from_tensor(&t.1)?);
        }
        Ok(self
            .run_values(vals)?
            .iter()
            .map(Value::to_tensor)
            .collect())
    }
}

/// Moves each `Dequantize` of a constant below the `Gather` that is its only reader,
/// so that only the gathered rows are widened: an embedding table stored as float16 or
/// int8 is dequantized per lookup, not whole on every run. Exact, because with a single
/// scale and zero point (or from float16) dequantizing is elementwise.
fn gather_before_dequantize(steps: &mut Vec<Step>, n_slots: &mut usize, fetches: &[usize]) {
    let mut producer: HashMap<usize, usize> = HashMap::new();
    let mut readers: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (st, step) in steps.iter().enumerate() {
        for &s in step.outputs.iter().flatten() {
            producer.insert(s, st);
        }
        for (k, &(s, _)) in step.inputs.iter().enumerate() {
            readers.entry(s).or_default().push((st, k));
        }
    }
    let mut moved: HashMap<usize, usize> = HashMap::new();
    for (d, step) in steps.iter().enumerate() {
        if !matches!(step.kernel, Kernel::Dequantize)
            || step.inputs.len() != 1
            || step.outputs.len() != 1
        {
            continue;
        }
        let Some(&c) = producer.get(&step.inputs[0].0) else {
            continue;
        };
        let dtype = match &steps[c].kernel {
            Kernel::Const(value) => value.dtype(),
            Kernel::TableConst(t) => t.dtype(),
            _ => continue,
        };
        let elementwise = match &step.quant.inputs[0] {
            None => dtype == DType::F16,
            Some(q) => q.axis.is_none() && q.scale.len() == 1 && q.zero_point.len() == 1,
        };
        let Some(t) = step.outputs[0] else { continue };
        if !elementwise || fetches.contains(&t) {
            continue;
        }
        if let Some(&[(g, 0)]) = readers.get(&t).map(Vec::as_slice) {
            if matches!(steps[g].kernel, Kernel::Gather { .. })
                && matches!(steps[g].outputs.first(), Some(Some(_)))
            {
                moved.insert(g, d);
            }
        }
    }
    if moved.is_empty() {
        return;
    }
    for (&g, &d) in &moved {
        let gathered = *n_slots;
        *n_slots += 1;
        let q = steps[d].quant.inputs[0].clone();
        let table = steps[d].inputs[0].0;
        let out = steps[g].outputs[0];
        steps[g].inputs[0] = (table, false);
        steps[g].outputs[0] = Some(gathered);
        steps[g].quant.inputs[0] = q.clone();
        steps[g].quant.outputs[0] = q;
        steps[d].inputs[0] = (gathered, false);
        steps[d].outputs[0] = out;
    }
    let dequantizes: std::collections::HashSet<usize> = moved.values().copied().collect();
    let mut old: Vec<Option<Step>> = std::mem::take(steps).into_iter().map(Some).collect();
    for i in 0..old.len() {
        if dequantizes.contains(&i) {
            continue;
        }
        steps.extend(old[i].take());
        if let Some(&d) = moved.get(&i) {
            steps.extend(old[d].take());
        }
    }
}

fn check_feed(inp: &PlanInput, v: &Value) -> Result<()> {
    if let Some(dt) = inp.dtype {
        if dt != v.dtype() {
            return Err(Error::msg(format!(
                "input '{}' is {dt}, the fed tensor is {}",
                inp.name,
                v.dtype()
            )));
        }
    }
    if let Some(shape) = &inp.shape {
        let ok = shape.len() == v.rank()
            && shape
                .iter()
                .zip(&v.shape)
                .all(|(&d, &s)| d < 0 || d as usize == s);
        if !ok {
            return Err(Error::msg(format!(
                "input '{}' has shape {shape:?}, the fed tensor has {:?}",
                inp.name, v.shape
            )));
        }
    }
    Ok(())
}

/// Runs `graph` once: feeds by node name, fetches by tensor reference.
pub fn run(graph: &Graph, feeds: &[(&str, Tensor)], fetches: &[TensorRef]) -> Result<Vec<Tensor>> {
    run_with(graph, feeds, fetches, Arithmetic::Reference)
}

/// [`run`] with the int8 kernels computing as `arithmetic` says.
pub fn run_with(
    graph: &Graph,
    feeds: &[(&str, Tensor)],
    fetches: &[TensorRef],
    arithmetic: Arithmetic,
) -> Result<Vec<Tensor>> {
    let names: Vec<&str> = feeds.iter().map(|(n, _)| *n).collect();
    Plan::compile(graph, &names, fetches)?
        .with_arithmetic(arithmetic)
        .run(feeds)
}

/// Evaluates once, at compile time, the `Dequantize` and `Cast` steps whose inputs are
/// all constants: fp16 and weight-only int8 weights are widened to float once per
/// plan, as LiteRT does when it prepares a model, not once per batch.
/// Makes each large constant that only a `Gather` reads (as its table) part of that
/// gather, which then copies the rows it needs from the tensor: an embedding table is
/// never converted whole. Every other large constant is converted here.
fn gather_from_tables(steps: &mut Vec<Step>, fetches: &[usize]) -> Result<()> {
    let mut readers: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (st, step) in steps.iter().enumerate() {
        for (k, &(s, _)) in step.inputs.iter().enumerate() {
            readers.entry(s).or_default().push((st, k));
        }
    }
    let mut absorbed = vec![false; steps.len()];
    for c in 0..steps.len() {
        let Kernel::TableConst(table) = &steps[c].kernel else {
            continue;
        };
        let Some(&Some(s)) = steps[c].outputs.first() else {
            continue;
        };
        if steps[c].outputs.len() != 1 || fetches.contains(&s) {
            continue;
        }
        let Some(&[(g, 0)]) = readers.get(&s).map(Vec::as_slice) else {
            continue;
        };
        let Kernel::Gather { axis_input } = steps[g].kernel else {
            continue;
        };
        let table = table.clone();
        let gather = &mut steps[g];
        gather.kernel = Kernel::GatherTable { table, axis_input };
        gather.inputs.remove(0);
        if !gather.quant.inputs.is_empty() {
            gather.quant.inputs.remove(0);
        }
        absorbed[c] = true;
    }
    let mut k = 0;
    steps.retain(|_| {
        k += 1;
        !absorbed[k - 1]
    });
    for step in steps.iter_mut() {
        if let Kernel::TableConst(t) = &step.kernel {
            step.kernel = Kernel::Const(Value::from_const_tensor(t)?);
        }
    }
    Ok(())
}

fn fold_constant_casts(steps: &mut [Step]) -> Result<()> {
    let mut constant: HashMap<usize, Value> = HashMap::new();
    for step in steps.iter_mut() {
        let single_output = step.outputs.len() <= 1;
        if let (Kernel::Const(v), true) = (&step.kernel, single_output) {
            if let Some(Some(s)) = step.outputs.first() {
                constant.insert(*s, v.clone());
            }
            continue;
        }
        if !matches!(step.kernel, Kernel::Dequantize | Kernel::Cast(_)) || !single_output {
            continue;
        }
        let Some(args) = step
            .inputs
            .iter()
            .map(|(s, _)| constant.get(s).cloned())
            .collect::<Option<Vec<Value>>>()
        else {
            continue;
        };
        let mut outs = super::exec_kernel(&step.kernel, args, &step.quant)
            .map_err(|e| e.context(format!("node '{}' ({})", step.name, step.op)))?;
        if outs.len() != 1 {
            continue;
        }
        let v = outs.remove(0);
        if let Some(Some(s)) = step.outputs.first() {
            constant.insert(*s, v.clone());
        }
        step.kernel = Kernel::Const(v);
        step.inputs.clear();
    }
    Ok(())
}

/// Gives each float `Conv2D`, `DepthwiseConv2dNative` and `MatMul` step the `BiasAdd`
/// (NHWC) and then the `Relu` or `Relu6` that are the only readers of its output, so
/// that the matrix kernel applies them to each tile of outputs while it is in cache
/// ([`super::nn::Epilogue`], the same f32 arithmetic) instead of in two more passes
/// over the whole batch. Only steps without quantization take part; the fused step
/// takes the place of the last step it absorbs, where all of its inputs exist.
fn fuse_float_epilogues(steps: &mut Vec<Step>, fetches: &[usize]) {
    let mut readers: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (st, step) in steps.iter().enumerate() {
        for (k, &(s, _)) in step.inputs.iter().enumerate() {
            readers.entry(s).or_default().push((st, k));
        }
    }
    let float = |step: &Step| {
        step.quant.inputs.iter().all(Option::is_none)
            && step.quant.outputs.iter().all(Option::is_none)
    };
    // The single reader (at input 0) of `step`'s single output, when not a fetch.
    let sole_reader = |step: &Step| -> Option<usize> {
        let [Some(t)] = step.outputs.as_slice() else {
            return None;
        };
        if fetches.contains(t) {
            return None;
        }
        match readers.get(t).map(Vec::as_slice) {
            Some(&[(r, 0)]) => Some(r),
            _ => None,
        }
    };
    // Steps absorbed or moved, and where each fused step (and a squeeze after it) goes.
    let mut gone = vec![false; steps.len()];
    let mut place: HashMap<usize, Vec<usize>> = HashMap::new();
    for c in 0..steps.len() {
        let matrix = matches!(
            steps[c].kernel,
            Kernel::Conv2D(_) | Kernel::Depthwise(_) | Kernel::MatMul { .. }
        );
        if !matrix || !float(&steps[c]) || steps[c].inputs.len() != 2 {
            continue;
        }
        let mut last = c;
        // A `Squeeze` between the product and its bias (a conv1d's `[n, 1, t, o]`
        // output squeezed to `[n, t, o]`) moves after them: with `o > 1` it keeps the
        // last axis, which the bias and activation run along, so the same values.
        let mut squeeze = None;
        if let Some(q) = sole_reader(&steps[c]) {
            let s = &steps[q];
            let before_epilogue = sole_reader(s).is_some_and(|r| {
                matches!(
                    steps[r].kernel,
                    Kernel::BiasAdd {
                        channels_first: false
                    } | Kernel::Unary(UnaryOp::Relu | UnaryOp::Relu6)
                )
            });
            if matches!(s.kernel, Kernel::Squeeze(_))
                && s.inputs.len() == 1
                && float(s)
                && before_epilogue
                && const_channels(steps, steps[c].inputs[1].0).is_some_and(|o| o > 1)
            {
                squeeze = Some(q);
                last = q;
            }
        }
        let mut bias = None;
        if let Some(r) = sole_reader(&steps[last]) {
            let s = &steps[r];
            if matches!(
                s.kernel,
                Kernel::BiasAdd {
                    channels_first: false
                }
            ) && s.inputs.len() == 2
                && float(s)
            {
                bias = Some(s.inputs[1].0);
                last = r;
                gone[r] = true;
            }
        }
        let mut act = Act::None;
        if let Some(r) = sole_reader(&steps[last]) {
            let s = &steps[r];
            let a = match s.kernel {
                Kernel::Unary(UnaryOp::Relu) => Act::Relu,
                Kernel::Unary(UnaryOp::Relu6) => Act::Relu6,
                _ => Act::None,
            };
            if a != Act::None && s.inputs.len() == 1 && float(s) {
                act = a;
                last = r;
                gone[r] = true;
            }
        }
        if last == c || Some(last) == squeeze {
            continue;
        }
        let out = steps[last].outputs.clone();
        let mut moved = vec![c];
        match squeeze {
            // The product keeps its output slot, which the squeeze reads; the squeeze
            // writes what the last absorbed step wrote.
            Some(q) => {
                steps[q].outputs = out;
                gone[q] = true;
                moved.push(q);
            }
            None => steps[c].outputs = out,
        }
        let step = &mut steps[c];
        if let Some(b) = bias {
            step.inputs.push((b, false));
            step.quant.inputs.push(None);
        }
        step.fused = Some(Fused {
            bias: bias.is_some(),
            act,
        });
        gone[c] = true;
        place.insert(last, moved);
    }
    if place.is_empty() {
        return;
    }
    let mut old: Vec<Option<Step>> = std::mem::take(steps).into_iter().map(Some).collect();
    for i in 0..old.len() {
        if let Some(moved) = place.get(&i) {
            for &m in moved {
                steps.extend(old[m].take());
            }
        } else if !gone[i] {
            steps.extend(old[i].take());
        }
    }
}

/// The output channels of the constant HWIO filter in `slot` (its last dimension),
/// when a constant step makes it.
fn const_channels(steps: &[Step], slot: usize) -> Option<usize> {
    steps.iter().find_map(|s| match &s.kernel {
        Kernel::Const(v) if s.outputs.first() == Some(&Some(slot)) && v.rank() == 4 => {
            v.shape.last().copied()
        }
        _ => None,
    })
}

/// Runs a step made by [`fuse_float_epilogues`]: the fused float kernel, or, when an
/// input is not float32 after all, the absorbed ops one by one.
fn run_fused(step: &Step, mut args: Vec<Value>, f: Fused) -> Result<Vec<Value>> {
    use super::nn;
    let all_f32 = args.iter().all(|v| v.dtype() == DType::F32);
    if !all_f32 {
        let bias = if f.bias { args.pop() } else { None };
        let n = args.len();
        let quant = StepQuant {
            inputs: step.quant.inputs[..n].to_vec(),
            ..step.quant.clone()
        };
        let mut y = super::exec_kernel(&step.kernel, args, &quant)?;
        if y.len() != 1 {
            return Err(Error::msg("a fused matrix step must have one output"));
        }
        let mut v = y.remove(0);
        if let Some(b) = bias {
            v = super::elementwise::bias_add(v, b, false)?;
        }
        v = match f.act {
            Act::None => v,
            Act::Relu => super::elementwise::unary(UnaryOp::Relu, v)?,
            Act::Relu6 => super::elementwise::unary(UnaryOp::Relu6, v)?,
        };
        return Ok(vec![v]);
    }
    let bias = if f.bias {
        let b = &args[2];
        if b.rank() != 1 {
            return Err(Error::msg(format!(
                "bias must be a vector, got shape {:?}",
                b.shape
            )));
        }
        Some(b.slice::<f32>()?)
    } else {
        None
    };
    let epi = nn::Epilogue { bias, act: f.act };
    let (x, w) = (&args[0], &args[1]);
    let y = match &step.kernel {
        Kernel::Conv2D(win) => nn::conv2d_ex(x, w, win, epi)?,
        Kernel::Depthwise(win) => nn::depthwise_conv2d_ex(x, w, win, epi)?,
        Kernel::MatMul { ta, tb } => nn::matmul_ex(x, w, *ta, *tb, epi)?,
        _ => return Err(Error::msg("this kernel takes no fused epilogue")),
    };
    Ok(vec![y])
}
