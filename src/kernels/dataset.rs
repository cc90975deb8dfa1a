//! Running a plan over `.npy` data sets: batches are read on demand and run in
//! parallel, so memory is bounded by a window of batches, never the data set.

use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::elementwise::cast;
use super::plan::Plan;
use super::value::Value;
use crate::error::{Error, Result};
use crate::ir::{DType, Graph, QuantParams, Tensor};
use crate::npy::{NpyReader, NpyWriter};
use crate::spec::DatasetSpec;

/// A data set opened for streaming: one `.npy` per model input, optional labels.
pub struct Dataset {
    inputs: Vec<(String, NpyReader)>,
    labels: Option<NpyReader>,
    rows: usize,
    /// Int8 inputs fed from float data are quantized with these parameters.
    input_quant: Vec<(String, QuantParams)>,
}

impl Dataset {
    /// Opens every file of `spec`; all must have the same number of rows.
    pub fn open(spec: &DatasetSpec) -> Result<Dataset> {
        let mut inputs = Vec::new();
        let mut rows = None;
        let mut check = |r: &NpyReader| -> Result<()> {
            if r.shape().is_empty() {
                return Err(Error::file(
                    r.path(),
                    "a data set array needs a row dimension",
                ));
            }
            match rows {
                None => rows = Some(r.rows()),
                Some(n) if n != r.rows() => {
                    return Err(Error::file(
                        r.path(),
                        format!(
                            "has {} rows, other files of the data set have {n}",
                            r.rows()
                        ),
                    ))
                }
                _ => {}
            }
            Ok(())
        };
        for (name, path) in &spec.tensors {
            let r = NpyReader::open(path)?;
            check(&r)?;
            inputs.push((name.clone(), r));
        }
        let labels = match &spec.labels {
            Some(p) => {
                let r = NpyReader::open(p)?;
                check(&r)?;
                Some(r)
            }
            None => None,
        };
        Ok(Dataset {
            inputs,
            labels,
            rows: rows.unwrap_or(0),
            input_quant: Vec::new(),
        })
    }

    /// Feeds float data to the graph's int8 (and int16) inputs quantized with their parameters
    /// (as `validate` feeds an int8-input candidate), instead of refusing it.
    pub fn quantize_int8_inputs(mut self, graph: &Graph) -> Dataset {
        for name in &graph.inputs {
            let Some(n) = graph.node(name) else { continue };
            let int8 = matches!(
                n.attrs.get("dtype"),
                Some(crate::ir::Attr::Type(DType::I8 | DType::I16))
            );
            if let (true, Some(q)) = (int8, n.output_quant.get(&0)) {
                if q.scale.len() == 1 {
                    self.input_quant.push((name.clone(), q.clone()));
                }
            }
        }
        self
    }

    /// The labels file, if any.
    pub fn labels_path(&self) -> Option<&Path> {
        self.labels.as_ref().map(NpyReader::path)
    }

    /// The dtype conversions feeding `plan` makes, one line each (`input: float64 →
    /// float32 (file)`), to be reported: only float64 → float32 can round values;
    /// other conversions are checked to keep every value.
    pub fn casts(&self, plan: &Plan) -> Vec<String> {
        self.casts_to(plan.inputs().iter().map(|i| (i.name.as_str(), i.dtype)))
    }

    /// [`Dataset::casts`] for the placeholders of `graph`'s inputs.
    pub fn graph_casts(&self, graph: &Graph) -> Vec<String> {
        self.casts_to(graph.inputs.iter().map(|name| {
            let dt = graph.node(name).and_then(|n| match n.attrs.get("dtype") {
                Some(crate::ir::Attr::Type(t)) => Some(*t),
                _ => None,
            });
            (name.as_str(), dt)
        }))
    }

    fn casts_to<'a>(&self, inputs: impl Iterator<Item = (&'a str, Option<DType>)>) -> Vec<String> {
        inputs
            .filter_map(|(name, to)| {
                let (_, r) = self.inputs.iter().find(|(n, _)| n == name)?;
                let to = to?;
                let quantized = self.input_quant.iter().any(|(n, _)| n == name);
                (to != r.dtype() && !quantized)
                    .then(|| format!("{name}: {} → {to} ({})", r.dtype(), r.path().display()))
            })
            .collect()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn has_labels(&self) -> bool {
        self.labels.is_some()
    }

    /// The feeds of `plan` for rows `range`, converted to each placeholder's dtype
    /// (as a TensorFlow feed would be); integers that do not fit are an error.
    pub fn feeds(&self, plan: &Plan, range: Range<usize>) -> Result<Vec<Value>> {
        plan.inputs()
            .iter()
            .map(|inp| {
                let (_, reader) = self
                    .inputs
                    .iter()
                    .find(|(n, _)| *n == inp.name)
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "the data set has no tensor for input '{}'",
                            inp.name
                        ))
                    })?;
                let v = read_value(reader, range.clone())?;
                let path = reader.path();
                if v.dtype().is_float() {
                    let bad = match v.slice::<f32>() {
                        // A test that vectorizes first (the position's early exit does
                        // not), then the position only when there is one.
                        Ok(x) if all_finite(x) => None,
                        Ok(x) => x.iter().position(|f| !f.is_finite()),
                        Err(_) => v.to_f64s()?.iter().position(|f| !f.is_finite()),
                    };
                    if let Some(i) = bad {
                        let row_len = v.shape.iter().skip(1).product::<usize>().max(1);
                        return Err(Error::file(
                            path,
                            format!(
                                "row {}: {} at element {}; data set values must be finite",
                                range.start + i / row_len,
                                v.to_f64s()?[i],
                                i % row_len
                            ),
                        ));
                    }
                }
                let quant = self.input_quant.iter().find(|(n, _)| *n == inp.name);
                if let (Some((_, q)), true) = (quant, v.dtype().is_float()) {
                    let x = cast(&v, DType::F32)?;
                    let (s, z) = (q.scale[0], q.zero_point[0] as i32);
                    if inp.dtype == Some(DType::I16) {
                        return Ok(Value::from_vec(
                            v.shape.clone(),
                            x.slice::<f32>()?
                                .iter()
                                .map(|&f| {
                                    super::rounding::quantize_value(f, s, z, -32768, 32767) as i16
                                })
                                .collect(),
                        ));
                    }
                    return Ok(Value::from_vec(
                        v.shape.clone(),
                        x.slice::<f32>()?
                            .iter()
                            .map(|&f| super::rounding::quantize_value(f, s, z, -128, 127) as i8)
                            .collect(),
                    ));
                }
                match inp.dtype {
                    Some(dt) if dt != v.dtype() => {
                        convert_feed(&v, dt).map_err(|e| e.context(path.display().to_string()))
                    }
                    _ => Ok(v),
                }
            })
            .collect()
    }

    /// Class ids of rows `range`: integer labels as they are, one-hot or
    /// probability rows by their argmax.
    pub fn labels(&self, range: Range<usize>) -> Result<Option<Vec<i64>>> {
        let Some(r) = &self.labels else {
            return Ok(None);
        };
        let t = r.read_rows(range.start, range.end)?;
        class_ids(&t)
            .map(Some)
            .map_err(|e| e.context(r.path().display().to_string()))
    }
}

/// Whether every value is finite (no NaN or infinity), without an early exit, so that
/// it vectorizes.
fn all_finite(x: &[f32]) -> bool {
    x.chunks(256).all(|c| {
        c.iter().fold(0u32, |m, f| {
            m | u32::from(f.to_bits() & 0x7f80_0000 == 0x7f80_0000)
        }) == 0
    })
}

/// Rows `range` of `reader` as a value: float32, int32 and int64 rows are read straight
/// into the value's buffer (no byte buffer and element-wise copy in between).
fn read_value(reader: &NpyReader, range: Range<usize>) -> Result<Value> {
    #[cfg(target_endian = "little")]
    {
        fn direct<T: super::value::Elem + Copy>(
            reader: &NpyReader,
            range: Range<usize>,
            zero: T,
        ) -> Result<Value> {
            let elems = reader.shape().iter().skip(1).product::<usize>();
            let mut v =
                vec![zero; (range.end.min(reader.rows()).saturating_sub(range.start)) * elems];
            // SAFETY: a byte view of `v`'s elements, which are plain numbers valid for
            // every bit pattern; the file's elements are little-endian, as are these.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(v.as_slice()),
                )
            };
            let shape = reader.read_rows_into(range.start, range.end, bytes)?;
            Ok(Value::from_vec(shape, v))
        }
        match reader.dtype() {
            DType::F32 => return direct(reader, range, 0f32),
            DType::I32 => return direct(reader, range, 0i32),
            DType::I64 => return direct(reader, range, 0i64),
            _ => {}
        }
    }
    Value::from_tensor(&reader.read_rows(range.start, range.end)?)
}

fn convert_feed(v: &Value, to: DType) -> Result<Value> {
    let from = v.dtype();
    let ok = match (from.is_float(), to.is_float()) {
        (false, true) if from != DType::String => {
            // Integers above 2^24 (float32) or 2^53 have no exact float.
            let c = cast(v, to)?;
            let (a, b) = (v.to_i64s()?, c.to_f64s()?);
            if let Some(i) = a.iter().zip(&b).position(|(&x, &y)| x as f64 != y) {
                return Err(Error::msg(format!(
                    "{from} value {} (element {i} of the batch) has no exact {to}",
                    a[i]
                )));
            }
            return Ok(c);
        }
        (true, true) => {
            let c = cast(v, to)?;
            if let Some(i) = c.to_f64s()?.iter().position(|x| !x.is_finite()) {
                return Err(Error::msg(format!(
                    "{from} value {} (element {i} of the batch) overflows {to}",
                    v.to_f64s()?[i]
                )));
            }
            return Ok(c);
        }
        (_, true) => true,
        (false, false) => {
            let c = cast(v, to)?;
            if c.to_i64s()? != v.to_i64s()? {
                return Err(Error::msg(format!(
                    "values do not fit the input's {to} dtype"
                )));
            }
            return Ok(c);
        }
        (true, false) => false,
    };
    if !ok || from == DType::String {
        return Err(Error::msg(format!("{from} data cannot feed a {to} input")));
    }
    cast(v, to)
}

/// Class ids from labels: integers (shape `[n]` or `[n, 1]`) or one-hot rows (`[n, c]`).
pub fn class_ids(t: &Tensor) -> Result<Vec<i64>> {
    let shape = t.shape();
    let n = shape.first().copied().unwrap_or(0);
    if !t.dtype().is_float() && (shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) {
        return Ok(t.to_i64_vec()?);
    }
    if shape.len() == 2 && shape[1] > 0 {
        return Ok(argmax_rows(&t.to_f64_vec()?, n, shape[1]));
    }
    Err(Error::msg(format!(
        "labels must be class ids [n] or one-hot rows [n, classes], got {} {shape:?}",
        t.dtype()
    )))
}

/// Index of the first maximum of each row.
pub fn argmax_rows(v: &[f64], rows: usize, cols: usize) -> Vec<i64> {
    (0..rows)
        .map(|r| {
            let row = &v[r * cols..(r + 1) * cols];
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best as i64
        })
        .collect()
}

/// The bytes a batch's largest intermediate tensor should hold. Batches are sized to
/// it: activations of that size stay in cache and are allocated from memory the
/// allocator reuses, where tensors of tens of megabytes would be mapped afresh, and
/// their pages cleared by the kernel, for every op of every batch. About a core's L2
/// (1 MiB on Zen 4, 1.25–2 MiB on recent Intel cores): a MobileNet block's expanded
/// tensor (96 × 48 × 48 floats, 0.9 MB a row) written by the 1×1 expansion is then
/// read back by the depthwise from L2 rather than from L3 (the float MobileNet's
/// `eval` on one core: about 8% less CPU than with 4 MiB batches of 4 rows; the
/// fixtures' batches, whose rows are small, and the TextCNN's measured the same).
pub const BATCH_BYTES: usize = 1 << 20;

/// Rows of the first batch, which measures the plan's tensors for [`batch_rows`].
pub const PROBE_ROWS: usize = 4;

/// Rows per batch for a plan whose largest tensor holds `per_row` bytes a row: as many
/// as keep it within [`BATCH_BYTES`], from 1 to `max_rows`.
pub fn batch_rows(per_row: usize, max_rows: usize) -> usize {
    (BATCH_BYTES / per_row.max(1)).clamp(1, max_rows.max(1))
}

/// Row ranges over `[start, total)` in batches of `rows`.
pub fn batch_ranges(start: usize, total: usize, rows: usize) -> Vec<Range<usize>> {
    (start..total)
        .step_by(rows.max(1))
        .map(|s| s..(s + rows.max(1)).min(total))
        .collect()
}

/// Runs `plan` over rows `[0, samples)`: [`PROBE_ROWS`] rows first, then batches of at most
/// `batch_size` rows, fewer when the plan's tensors are large ([`batch_rows`]).
/// `map` runs on each batch's fetched values in parallel; `sink` receives the results
/// in row order. At most a window of a few batches per thread is in memory at once.
///
/// The loop runs on a thread of the rayon pool (the caller waits for it), so that the
/// kernels' parallel loops and the windows of batches start from inside the pool: from
/// outside, every window was handed to a worker and waited for, two thread switches
/// a window (about 2% of one-thread `eval` on a small CNN).
pub fn run_batches<R: Send>(
    plan: &Plan,
    data: &Dataset,
    batch_size: usize,
    samples: Option<usize>,
    map: impl Fn(Range<usize>, Vec<Value>) -> Result<R> + Sync,
    sink: impl FnMut(Range<usize>, R) -> Result<()> + Send,
) -> Result<()> {
    let map = &map;
    rayon::scope(|_| run_batches_here(plan, data, batch_size, samples, map, sink))
}

fn run_batches_here<R: Send>(
    plan: &Plan,
    data: &Dataset,
    batch_size: usize,
    samples: Option<usize>,
    map: impl Fn(Range<usize>, Vec<Value>) -> Result<R> + Sync,
    mut sink: impl FnMut(Range<usize>, R) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::usage("batch size must be at least 1"));
    }
    let total = samples.map_or(data.rows(), |s| s.min(data.rows()));
    let run = |r: &Range<usize>| {
        let feeds = data.feeds(plan, r.clone())?;
        let outs = plan
            .run_values(feeds)
            .map_err(|e| e.context(format!("rows {}..{}", r.start, r.end)))?;
        map(r.clone(), outs)
    };
    if total == 0 {
        return Ok(());
    }
    let probe = PROBE_ROWS.min(total);
    sink(0..probe, run(&(0..probe))?)?;
    let per_row = plan.peak_bytes() / probe;
    let batches = batch_ranges(probe, total, batch_rows(per_row, batch_size));
    let window = (rayon::current_num_threads() * 2).max(1);
    for chunk in batches.chunks(window) {
        let results: Vec<Result<R>> = chunk.par_iter().map(run).collect();
        for (r, res) in chunk.iter().zip(results) {
            sink(r.clone(), res?)?;
        }
    }
    Ok(())
}

/// How [`evaluate`] runs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub batch_size: usize,
    /// Only the first `samples` rows.
    pub samples: Option<usize>,
    /// Where to write the outputs: the first graph output goes to this path, output
    /// `k > 0` to `<stem>.<k>.npy` beside it.
    pub outputs_npy: Option<PathBuf>,
    /// Whose int8 arithmetic the kernels reproduce.
    pub arithmetic: super::Arithmetic,
    /// Where to count the samples done.
    pub progress: crate::progress::Progress,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 64,
            samples: None,
            outputs_npy: None,
            arithmetic: super::Arithmetic::Reference,
            progress: crate::progress::Progress::disabled(),
        }
    }
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub samples: usize,
    /// Top-1 accuracy of the first output against the labels, when there are labels.
    pub accuracy: Option<f64>,
    pub correct: usize,
    /// Files written (one per graph output) when asked for.
    pub written: Vec<PathBuf>,
}

fn output_path(base: &Path, k: usize) -> PathBuf {
    if k == 0 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    base.with_file_name(format!("{stem}.{k}.npy"))
}

/// Runs the graph's outputs on a data set: accuracy of the first output (class
/// scores `[n, classes]`) against the labels, and optionally the outputs as `.npy`.
pub fn evaluate(graph: &Graph, spec: &DatasetSpec, opts: &EvalOptions) -> Result<EvalReport> {
    let feeds: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
    if graph.outputs.is_empty() {
        return Err(Error::msg("the graph declares no outputs"));
    }
    let plan = Plan::compile(graph, &feeds, &graph.outputs)?.with_arithmetic(opts.arithmetic);
    let data = Dataset::open(spec)?.quantize_int8_inputs(graph);
    let total = opts.samples.map_or(data.rows(), |s| s.min(data.rows()));
    let mut writers: Vec<Option<NpyWriter>> = (0..graph.outputs.len()).map(|_| None).collect();
    let mut written = Vec::new();
    let mut correct = 0usize;
    let bar = opts
        .progress
        .start("evaluating", total as u64, crate::progress::Unit::Samples);
    run_batches(
        &plan,
        &data,
        opts.batch_size,
        opts.samples,
        |r, outs| {
            let n = r.end - r.start;
            let first = &outs[0];
            let preds = if first.rank() == 2 && first.shape[0] == n {
                Some(argmax_rows(&first.to_f64s()?, n, first.shape[1]))
            } else if first.rank() == 1 && first.shape[0] == n && !first.dtype().is_float() {
                Some(first.to_i64s()?)
            } else {
                None
            };
            let hits = match (data.labels(r.clone())?, preds) {
                (Some(l), Some(p)) => Some(l.iter().zip(&p).filter(|(a, b)| a == b).count()),
                (Some(_), None) => {
                    return Err(Error::msg(format!(
                        "output '{}' of shape {:?} is not class scores [batch, classes]",
                        graph.outputs[0], first.shape
                    )))
                }
                _ => None,
            };
            Ok((hits, outs))
        },
        |r, (hits, outs)| {
            bar.inc(r.len() as u64);
            correct += hits.unwrap_or(0);
            if let Some(base) = &opts.outputs_npy {
                for (k, v) in outs.iter().enumerate() {
                    if v.shape.first() != Some(&(r.end - r.start)) {
                        return Err(Error::msg(format!(
                            "output '{}' of shape {:?} has no batch dimension to write",
                            graph.outputs[k], v.shape
                        )));
                    }
                    if writers[k].is_none() {
                        let p = output_path(base, k);
                        writers[k] = Some(NpyWriter::create(&p, v.dtype(), total, &v.shape[1..])?);
                        written.push(p);
                    }
                    if let Some(w) = writers[k].as_mut() {
                        w.write_rows(&v.to_tensor())?;
                    }
                }
            }
            Ok(())
        },
    )?;
    bar.finish();
    for w in writers.into_iter().flatten() {
        w.finish()?;
    }
    Ok(EvalReport {
        samples: total,
        accuracy: data.has_labels().then(|| {
            if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            }
        }),
        correct,
        written,
    })
}

#[cfg(test)]
mod tests {
    use super::all_finite;

    #[test]
    fn all_finite_finds_every_non_finite_value() {
        let finite = [0.0, -0.0, 1e-45, -1e-40, f32::MAX, f32::MIN, 1.5];
        for len in [0usize, 1, 7, 255, 256, 257, 700] {
            let base: Vec<f32> = (0..len).map(|i| finite[i % finite.len()]).collect();
            assert!(all_finite(&base), "len {len}");
            for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, len / 2, 255, 256, len.saturating_sub(1)] {
                    if at < len {
                        let mut v = base.clone();
                        v[at] = bad;
                        assert!(!all_finite(&v), "{bad} at {at} of {len}");
                    }
                }
            }
        }
    }
}
