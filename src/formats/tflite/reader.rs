//! A minimal `.tflite` reader for inspection and tests: tensors, operators,
//! buffers with their sizes and file offsets, metadata and signatures. The
//! flatbuffer is verified before anything is read, so a damaged or hostile file
//! is an error, never a crash.

use std::ops::Range;

use super::model::builtin_name;
use super::schema as fb;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct QuantSummary {
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub quantized_dimension: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorSummary {
    pub name: String,
    /// The schema's `TensorType` value (0 = FLOAT32, 1 = FLOAT16, 9 = INT8, ...).
    pub type_code: i8,
    pub type_name: &'static str,
    pub shape: Vec<i32>,
    pub shape_signature: Option<Vec<i32>>,
    pub buffer: u32,
    /// Where the tensor's constant data lies in the file.
    pub data: Option<Range<usize>>,
    pub quant: Option<QuantSummary>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperatorSummary {
    pub builtin_code: i32,
    pub name: &'static str,
    pub version: i32,
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
    /// The schema's `BuiltinOptions` union type id (0 = none).
    pub options_type: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SignatureSummary {
    pub key: String,
    pub inputs: Vec<(String, u32)>,
    pub outputs: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub version: u32,
    pub description: String,
    pub subgraphs: usize,
    pub tensors: Vec<TensorSummary>,
    pub inputs: Vec<i32>,
    pub outputs: Vec<i32>,
    pub operators: Vec<OperatorSummary>,
    /// (builtin code, version) per operator code.
    pub op_codes: Vec<(i32, i32)>,
    /// File range of each buffer's data (`None` for an empty buffer).
    pub buffers: Vec<Option<Range<usize>>>,
    pub metadata: Vec<(String, Vec<u8>)>,
    pub signatures: Vec<SignatureSummary>,
}

fn type_name(code: i8) -> &'static str {
    match code {
        0 => "FLOAT32",
        1 => "FLOAT16",
        2 => "INT32",
        3 => "UINT8",
        4 => "INT64",
        5 => "STRING",
        6 => "BOOL",
        7 => "INT16",
        8 => "COMPLEX64",
        9 => "INT8",
        10 => "FLOAT64",
        11 => "COMPLEX128",
        12 => "UINT64",
        13 => "RESOURCE",
        14 => "VARIANT",
        15 => "UINT32",
        16 => "UINT16",
        17 => "INT4",
        18 => "BFLOAT16",
        _ => "UNKNOWN",
    }
}

/// Bytes per element of a fixed-size `TensorType` (`None` for strings, int4 and the like).
fn type_size(code: i8) -> Option<u64> {
    match code {
        3 | 6 | 9 => Some(1),
        1 | 7 | 16 | 18 => Some(2),
        0 | 2 | 15 => Some(4),
        4 | 8 | 10 | 12 => Some(8),
        11 => Some(16),
        _ => None,
    }
}

/// A constant's data must be exactly what its shape and type need.
fn check_data_len(type_code: i8, shape: &[i32], len: usize) -> std::result::Result<(), String> {
    let Some(size) = type_size(type_code) else {
        return Ok(());
    };
    let mut n: u64 = 1;
    for &d in shape {
        let d = u64::try_from(d).map_err(|_| format!("a constant has shape {shape:?}"))?;
        n = n
            .checked_mul(d)
            .ok_or_else(|| format!("the element count of shape {shape:?} overflows"))?;
    }
    let want = n
        .checked_mul(size)
        .ok_or_else(|| format!("the byte count of shape {shape:?} overflows"))?;
    if want != len as u64 {
        return Err(format!(
            "{len} bytes of data, but shape {shape:?} of {} needs {want}",
            type_name(type_code)
        ));
    }
    Ok(())
}

/// Reads the summary of a `.tflite` file's contents. `what` names the file in errors.
pub fn read(bytes: &[u8], what: &str) -> Result<ModelSummary> {
    let bad = |msg: String| Error::msg(format!("{what}: {msg}"));
    if bytes.len() < 8 || !fb::model_buffer_has_identifier(bytes) {
        return Err(bad("not a TFLite model (no TFL3 file identifier)".into()));
    }
    let model = fb::root_as_model(bytes).map_err(|e| bad(format!("invalid flatbuffer: {e}")))?;
    let base = bytes.as_ptr() as usize;
    let range_of = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };

    let buffers: Vec<Option<Range<usize>>> = model
        .buffers()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    b.data()
                        .filter(|d| !d.is_empty())
                        .map(|d| range_of(d.bytes()))
                })
                .collect()
        })
        .unwrap_or_default();

    let op_codes: Vec<(i32, i32)> = model
        .operator_codes()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let code = c
                        .builtin_code()
                        .0
                        .max(i32::from(c.deprecated_builtin_code()));
                    (code, c.version())
                })
                .collect()
        })
        .unwrap_or_default();

    let subgraphs = model.subgraphs().map_or(0, |s| s.len());
    let sg = model
        .subgraphs()
        .filter(|s| !s.is_empty())
        .map(|s| s.get(0))
        .ok_or_else(|| bad("the model has no subgraph".into()))?;

    let mut tensors = Vec::new();
    for t in sg.tensors().iter().flatten() {
        let buffer = t.buffer();
        let data = if buffer == 0 {
            None
        } else {
            let b = buffers.get(buffer as usize).ok_or_else(|| {
                bad(format!(
                    "tensor '{}' refers to missing buffer {buffer}",
                    t.name().unwrap_or("")
                ))
            })?;
            b.clone()
        };
        let shape: Vec<i32> = t.shape().map(|s| s.iter().collect()).unwrap_or_default();
        if let Some(r) = &data {
            check_data_len(t.type_().0, &shape, r.len()).map_err(|e| {
                bad(format!(
                    "tensor '{}' (buffer {buffer}): {e}",
                    t.name().unwrap_or("")
                ))
            })?;
        }
        let quant = t.quantization().and_then(|q| {
            let scale: Vec<f32> = q.scale()?.iter().collect();
            let zero_point: Vec<i64> = q
                .zero_point()
                .map(|z| z.iter().collect())
                .unwrap_or_default();
            Some(QuantSummary {
                scale,
                zero_point,
                quantized_dimension: q.quantized_dimension(),
            })
        });
        tensors.push(TensorSummary {
            name: t.name().unwrap_or("").to_string(),
            type_code: t.type_().0,
            type_name: type_name(t.type_().0),
            shape,
            shape_signature: t.shape_signature().map(|s| s.iter().collect()),
            buffer,
            data,
            quant,
        });
    }
    let n_tensors = tensors.len() as i64;
    let check_ids = |ids: &[i32], ctx: &str| -> Result<()> {
        match ids.iter().find(|&&t| t < -1 || i64::from(t) >= n_tensors) {
            Some(t) => Err(bad(format!(
                "{ctx} refers to tensor {t}, which does not exist"
            ))),
            None => Ok(()),
        }
    };
    let inputs: Vec<i32> = sg.inputs().map(|v| v.iter().collect()).unwrap_or_default();
    let outputs: Vec<i32> = sg.outputs().map(|v| v.iter().collect()).unwrap_or_default();
    check_ids(&inputs, "the subgraph's inputs")?;
    check_ids(&outputs, "the subgraph's outputs")?;

    let mut operators = Vec::new();
    for (k, op) in sg.operators().iter().flatten().enumerate() {
        let &(code, version) = op_codes.get(op.opcode_index() as usize).ok_or_else(|| {
            bad(format!(
                "operator {k} has opcode index {}, which does not exist",
                op.opcode_index()
            ))
        })?;
        let inputs: Vec<i32> = op.inputs().map(|v| v.iter().collect()).unwrap_or_default();
        let outputs: Vec<i32> = op.outputs().map(|v| v.iter().collect()).unwrap_or_default();
        check_ids(&inputs, &format!("operator {k}"))?;
        check_ids(&outputs, &format!("operator {k}"))?;
        operators.push(OperatorSummary {
            builtin_code: code,
            name: builtin_name(code),
            version,
            inputs,
            outputs,
            options_type: op.builtin_options_type().0,
        });
    }

    let mut metadata = Vec::new();
    for m in model.metadata().iter().flatten() {
        let data = buffers
            .get(m.buffer() as usize)
            .ok_or_else(|| bad(format!("metadata refers to missing buffer {}", m.buffer())))?
            .clone()
            .map(|r| bytes[r].to_vec())
            .unwrap_or_default();
        metadata.push((m.name().unwrap_or("").to_string(), data));
    }

    let maps =
        |v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::TensorMap<'_>>>>| {
            v.iter()
                .flatten()
                .map(|m| (m.name().unwrap_or("").to_string(), m.tensor_index()))
                .collect::<Vec<_>>()
        };
    let signatures = model
        .signature_defs()
        .iter()
        .flatten()
        .map(|s| SignatureSummary {
            key: s.signature_key().unwrap_or("").to_string(),
            inputs: maps(s.inputs()),
            outputs: maps(s.outputs()),
        })
        .collect();

    Ok(ModelSummary {
        version: model.version(),
        description: model.description().unwrap_or("").to_string(),
        subgraphs,
        tensors,
        inputs,
        outputs,
        operators,
        op_codes,
        buffers,
        metadata,
        signatures,
    })
}

impl ModelSummary {
    /// Bytes of constant data (all non-empty buffers except metadata).
    pub fn constant_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.tensors
            .iter()
            .filter_map(|t| t.data.clone())
            .filter(|r| seen.insert(r.start))
            .map(|r| r.len())
            .sum()
    }

    /// A human-readable listing (what `qpipe inspect` prints).
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "TFLite schema version {}, description {:?}, {} subgraph(s), {} tensors, {} operators, {} buffers",
            self.version,
            self.description,
            self.subgraphs,
            self.tensors.len(),
            self.operators.len(),
            self.buffers.len()
        );
        let _ = writeln!(s, "inputs {:?} outputs {:?}", self.inputs, self.outputs);
        for (k, op) in self.operators.iter().enumerate() {
            let _ = writeln!(
                s,
                "  op {k:3} {} v{} {:?} -> {:?}",
                op.name, op.version, op.inputs, op.outputs
            );
        }
        for (k, t) in self.tensors.iter().enumerate() {
            let _ = write!(s, "  tensor {k:3} {} {} {:?}", t.name, t.type_name, t.shape);
            if let Some(sig) = &t.shape_signature {
                let _ = write!(s, " signature {sig:?}");
            }
            if let Some(r) = &t.data {
                let _ = write!(s, " buffer {} ({} bytes at {})", t.buffer, r.len(), r.start);
            }
            if let Some(q) = &t.quant {
                let _ = write!(
                    s,
                    " quant {} scale(s) dim {}",
                    q.scale.len(),
                    q.quantized_dimension
                );
            }
            s.push('\n');
        }
        for (name, data) in &self.metadata {
            let text = String::from_utf8_lossy(data);
            let _ = writeln!(s, "  metadata {name}: {:?}", text.trim_end_matches('\0'));
        }
        for sig in &self.signatures {
            let _ = writeln!(
                s,
                "  signature {}: inputs {:?} outputs {:?}",
                sig.key, sig.inputs, sig.outputs
            );
        }
        s
    }

    /// Operator count by TFLite name.
    pub fn op_histogram(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut h = std::collections::BTreeMap::new();
        for op in &self.operators {
            *h.entry(op.name).or_insert(0) += 1;
        }
        h
    }

    fn io(&self, list: &[i32]) -> Vec<&TensorSummary> {
        list.iter()
            .filter_map(|&i| usize::try_from(i).ok().and_then(|i| self.tensors.get(i)))
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let tensor = |t: &TensorSummary| {
            serde_json::json!({
                "name": t.name,
                "type": t.type_name,
                "shape": t.shape_signature.as_ref().unwrap_or(&t.shape),
                "quantization": t.quant.as_ref().map(|q| serde_json::json!({
                    "scale": q.scale, "zero_point": q.zero_point, "quantized_dimension": q.quantized_dimension,
                })),
            })
        };
        serde_json::json!({
            "format": "tflite",
            "version": self.version,
            "description": self.description,
            "subgraphs": self.subgraphs,
            "tensors": self.tensors.len(),
            "constant_bytes": self.constant_bytes(),
            "operators": self.op_histogram(),
            "op_versions": self.op_codes.iter().map(|(c, v)| serde_json::json!({"op": builtin_name(*c), "version": v})).collect::<Vec<_>>(),
            "inputs": self.io(&self.inputs).into_iter().map(tensor).collect::<Vec<_>>(),
            "outputs": self.io(&self.outputs).into_iter().map(tensor).collect::<Vec<_>>(),
            "signatures": self.signatures.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        })
    }
}
