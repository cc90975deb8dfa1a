//! `fp16_cast`: mixed precision as LiteRT runs it. Float32 constants are stored as
//! float16 (rounded to nearest even) and widened back by a `Dequantize` node, so
//! arithmetic stays float32.
//!
//! The float16 constant keeps the original node name (so `keep_float`, reports and
//! later stages name weights as before); its readers read `<name>/dequantize`, a
//! `Dequantize` node with `T = float16`, `dtype = float32`.
//!
//! Config: `input` (required); `min_elements` (default 1: every float32 constant,
//! scalars included, as the TFLite converter's float16 mode does); `keep_float`
//! (constant node names to leave float32; each must name a float32 constant).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{
    Artifact, ConfigError, ConfigTable, Role, Stage, StageContext, StageDeps, StageOutput,
};
use crate::error::{Error, Result};
use crate::ir::{Attr, DType, Graph, Node, Tensor, TensorRef};

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16CastConfig {
    pub input: String,
    #[serde(default = "one")]
    pub min_elements: usize,
    #[serde(default)]
    pub keep_float: Vec<String>,
}

pub struct Fp16Cast {
    config: Fp16CastConfig,
}

pub fn build(table: &ConfigTable) -> std::result::Result<Box<dyn Stage>, ConfigError> {
    Ok(Box::new(Fp16Cast {
        config: super::parse_config(table)?,
    }))
}

/// What [`cast_fp16`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fp16Report {
    pub tensors_cast: usize,
    pub tensors_kept_float: usize,
    /// Bytes of the cast tensors before (float32) and after (float16).
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// Casts the float32 constants of `graph` with at least `min_elements` elements,
/// except those named in `keep_float`, to float16 behind a `Dequantize` node.
pub fn cast_fp16(
    graph: &Graph,
    min_elements: usize,
    keep_float: &[String],
) -> Result<(Graph, Fp16Report)> {
    let mut g = graph.clone();
    let keep: HashSet<&str> = keep_float.iter().map(String::as_str).collect();
    for k in &keep {
        match g.node(k).and_then(Node::const_value) {
            Some(t) if t.dtype() == DType::F32 => {}
            Some(t) => {
                return Err(Error::usage(format!(
                    "keep_float: '{k}' is a {} constant, not float32",
                    t.dtype()
                )))
            }
            None => {
                return Err(Error::usage(format!(
                    "keep_float: '{k}' is not a constant node of the graph"
                )))
            }
        }
    }
    let outputs: HashSet<&str> = graph.outputs.iter().map(|r| r.node.as_str()).collect();
    let names: HashSet<String> = g.nodes.iter().map(|n| n.name.clone()).collect();
    let mut report = Fp16Report::default();
    let mut renamed: Vec<(String, String)> = Vec::new();
    let mut added = Vec::new();
    for n in g.nodes.iter_mut() {
        let Some(t) = n.const_value() else { continue };
        if t.dtype() != DType::F32 {
            continue;
        }
        if keep.contains(n.name.as_str())
            || t.len() < min_elements
            || outputs.contains(n.name.as_str())
        {
            report.tensors_kept_float += 1;
            continue;
        }
        let ht = match to_f16(t) {
            Ok(ht) => ht,
            Err((i, v)) => {
                return Err(Error::msg(format!(
                    "constant '{}': element {i} ({v}) overflows float16; list it in keep_float",
                    n.name
                )))
            }
        };
        report.tensors_cast += 1;
        report.bytes_before += t.byte_size();
        report.bytes_after += ht.byte_size();
        n.attrs.insert("dtype".into(), Attr::Type(DType::F16));
        n.attrs.insert("value".into(), Attr::Tensor(ht));
        let mut dq_name = format!("{}/dequantize", n.name);
        let mut k = 1;
        while names.contains(&dq_name) {
            dq_name = format!("{}/dequantize_{k}", n.name);
            k += 1;
        }
        let mut dq = Node::new(dq_name.clone(), crate::ir::Op::Dequantize.name())
            .with_input(TensorRef::new(n.name.clone(), 0))
            .with_attr("T", Attr::Type(DType::F16))
            .with_attr("dtype", Attr::Type(DType::F32));
        dq.device = n.device.clone();
        added.push(dq);
        renamed.push((n.name.clone(), dq_name));
    }
    let map: std::collections::HashMap<String, String> = renamed.into_iter().collect();
    for n in g.nodes.iter_mut() {
        for r in n.inputs.iter_mut() {
            if let Some(d) = map.get(&r.node) {
                *r = TensorRef::new(d.clone(), r.index);
            }
        }
    }
    g.nodes.extend(added);
    Ok((g, report))
}

impl Stage for Fp16Cast {
    fn role(&self) -> Role {
        Role::Model {
            label: "fp16".into(),
            float: false,
        }
    }
    fn version(&self) -> u32 {
        1
    }
    fn deps(&self) -> StageDeps {
        StageDeps {
            stages: vec![("input".into(), self.config.input.clone())],
            ..StageDeps::default()
        }
    }
    fn config(&self) -> serde_json::Value {
        super::config_json(&self.config)
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        let graph = ctx.input_graph("input")?;
        let (g, r) = cast_fp16(&graph, self.config.min_elements, &self.config.keep_float)
            .map_err(|e| e.context(format!("stage '{}'", ctx.id)))?;
        let mut metrics = serde_json::Map::new();
        metrics.insert("tensors_cast".into(), r.tensors_cast.into());
        metrics.insert("tensors_kept_float".into(), r.tensors_kept_float.into());
        metrics.insert("bytes_before".into(), r.bytes_before.into());
        metrics.insert("bytes_after".into(), r.bytes_after.into());
        Ok(StageOutput {
            artifact: Artifact::Graph(g.into()),
            metrics,
            files: vec![],
        })
    }
}

/// A float32 tensor rounded to float16 (nearest even, as `half` and TensorFlow do),
/// converted block by block in parallel; or the first element (index, value) that is
/// finite but beyond float16's range.
fn to_f16(t: &Tensor) -> std::result::Result<Tensor, (usize, f32)> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 14;
    let src = t.bytes();
    let (data, first_bad) = crate::ir::filled_buffer(t.len() * 2, |out| {
        out.par_chunks_mut(2 * BLOCK)
            .zip(src.par_chunks(4 * BLOCK))
            .enumerate()
            .filter_map(|(b, (dst, src))| {
                let wide: Vec<f32> = src
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let mut narrow = vec![half::f16::ZERO; wide.len()];
                narrow.convert_from_f32_slice(&wide);
                for (d, h) in dst.chunks_exact_mut(2).zip(&narrow) {
                    d.copy_from_slice(&h.to_le_bytes());
                }
                narrow
                    .iter()
                    .zip(&wide)
                    .position(|(h, v)| h.is_infinite() && v.is_finite())
                    .map(|k| (b * BLOCK + k, wide[k]))
            })
            .min_by_key(|&(i, _)| i)
    });
    match first_bad {
        Some(bad) => Err(bad),
        None => Ok(Tensor::from_bytes(DType::F16, t.shape().to_vec(), data)
            .expect("two bytes per element of the same shape")),
    }
}
