//! The reference side of `validate` and of the fallback's [`super::measure`], run once
//! per reference artifact, data set, sample count, qpipe version and runtime, and
//! shared as a memo in the cache by every stage that asks (every validate of a run,
//! the fallback's candidates, later runs).
//!
//! The memo holds the reference's outputs for every row, and for the per-layer table
//! its float intermediate tensors for the first `layer_rows` rows only: what the
//! table needs is a joint pass (the RMSE and SQNR of a candidate tensor against the
//! reference tensor, element by element), which per-tensor statistics cannot give,
//! and every intermediate tensor of every row would be unbounded (the compute-heavy
//! TextCNN makes about 260 KB a row, 0.5 GB over its 2,000 eval rows). So the table
//! is measured on as many leading rows as [`LAYER_BYTES`] of reference tensors hold
//! (all rows of the fixtures; about 120 of the TextCNN's), with or without the memo.
//! Outputs beyond [`OUTPUT_BYTES`] (as f64), or an output whose first dimension is
//! not the batch, make the reference unmemoizable: validate then runs it beside the
//! candidate, batch by batch, with the same batches and the same results.

use std::collections::BTreeMap;
use std::ops::Range;

use rayon::prelude::*;

use super::{xnnpack_cpu, Runtime, BATCH};
use crate::error::{Error, Result};
use crate::ir::{Graph, TensorRef};
use crate::kernels::dataset::{batch_ranges, batch_rows, Dataset, PROBE_ROWS};
use crate::kernels::{Arithmetic, Buf, Plan, Value};
use crate::spec::DatasetSpec;
use crate::stages::quantize_int8::calibration::{calibrated_tensors, dataset_digest};
use crate::stages::Memo;

/// The most bytes of reference intermediate tensors the per-layer table is measured
/// on (and the memo keeps): it sets `layer_rows`.
pub const LAYER_BYTES: usize = 32 << 20;

/// The most bytes (8 per element) of reference outputs over every row that a memo
/// holds; beyond it the reference runs beside each candidate.
pub const OUTPUT_BYTES: usize = 64 << 20;

/// What the reference pass and the candidate pass agree on before they run: the
/// same for a reference with or without its memo.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    /// Bytes a row of the reference's largest tensor holds (outputs-only plan): with
    /// the candidate's, it sizes the batches.
    pub peak_per_row: usize,
    /// The first rows, on which the per-layer table is measured.
    pub layer_rows: usize,
    /// The reference's float tensors with the batch as their first dimension: those
    /// a candidate tensor may be compared with.
    pub layer_set: Vec<TensorRef>,
    /// Every output has the batch as its first dimension.
    batch_major: bool,
    /// Elements a row of all outputs holds.
    out_row_elems: usize,
}

fn compile(g: &Graph, fetches: &[TensorRef], arith: Arithmetic) -> Result<Plan> {
    let feeds: Vec<&str> = g.inputs.iter().map(String::as_str).collect();
    Ok(Plan::compile(g, &feeds, fetches)
        .map_err(|e| e.context("reference"))?
        .with_arithmetic(arith))
}

/// The tensors a memo may keep: calibration's (every non-constant output 0 and
/// every tensor a node reads), less the inputs' other outputs.
fn layer_candidates(g: &Graph) -> Vec<TensorRef> {
    let feeds: Vec<&str> = g.inputs.iter().map(String::as_str).collect();
    calibrated_tensors(g)
        .into_iter()
        .filter(|r| !feeds.contains(&r.node.as_str()) || r.index == 0)
        .collect()
}

/// Runs the reference on the first rows to find its [`Layout`].
pub(crate) fn layout(
    ref_fused: &Graph,
    ds: &Dataset,
    total: usize,
    arith: Arithmetic,
) -> Result<Layout> {
    let probe = PROBE_ROWS.min(total).max(1);
    let out_plan = compile(ref_fused, &ref_fused.outputs, arith)?;
    let outs = out_plan.run_values(ds.feeds(&out_plan, 0..probe)?)?;
    let peak_per_row = out_plan.peak_bytes() / probe;
    let batch_major = outs.iter().all(|v| v.shape.first() == Some(&probe));
    let out_row_elems = outs.iter().map(|v| v.len() / probe).sum();
    let candidates = layer_candidates(ref_fused);
    let plan = compile(ref_fused, &candidates, arith)?;
    let values = plan.run_values(ds.feeds(&plan, 0..probe)?)?;
    let mut layer_set = Vec::new();
    let mut bytes = 0;
    for (r, v) in candidates.into_iter().zip(values) {
        if matches!(&*v.buf, Buf::F32(_)) && v.shape.first() == Some(&probe) {
            bytes += v.len() * 4;
            layer_set.push(r);
        }
    }
    let per_row = (bytes / probe).max(1);
    Ok(Layout {
        peak_per_row,
        layer_rows: (LAYER_BYTES / per_row).clamp(1, total.max(1)),
        layer_set,
        batch_major,
        out_row_elems,
    })
}

/// One reference output over every row.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoOutput {
    /// A float dtype (else integer class ids or the like).
    pub float: bool,
    /// The shape of a row.
    pub row_shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// The reference's results on a data set: see the module comment.
#[derive(Debug, Clone, PartialEq)]
pub struct RefMemo {
    pub rows: usize,
    pub peak_per_row: usize,
    pub layer_rows: usize,
    pub outputs: Vec<MemoOutput>,
    /// Tensor name → (row shape, values of the first `layer_rows` rows).
    pub layers: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl RefMemo {
    /// Output `k` of `rows`: its shape (with the batch) and values.
    pub fn output(&self, k: usize, rows: &Range<usize>) -> (Vec<usize>, bool, &[f64]) {
        let o = &self.outputs[k];
        let per: usize = o.row_shape.iter().product();
        let mut shape = vec![rows.len()];
        shape.extend(&o.row_shape);
        (shape, o.float, &o.values[rows.start * per..rows.end * per])
    }

    /// Tensor `name` of `rows` (within `layer_rows`), when the memo holds it.
    pub fn layer(&self, name: &str, rows: &Range<usize>) -> Option<(Vec<usize>, &[f32])> {
        let (row_shape, v) = self.layers.get(name)?;
        let per: usize = row_shape.iter().product();
        let mut shape = vec![rows.len()];
        shape.extend(row_shape);
        Some((shape, v.get(rows.start * per..rows.end * per)?))
    }

    pub fn layout_rows(&self) -> (usize, usize) {
        (self.peak_per_row, self.layer_rows)
    }
}

/// Runs the reference on rows `[0, total)`: `None` when its outputs are too large to
/// keep or not batch-major.
pub(crate) fn compute(
    ref_fused: &Graph,
    ds: &Dataset,
    total: usize,
    arith: Arithmetic,
    inc: &dyn Fn(u64),
) -> Result<Option<RefMemo>> {
    let lay = layout(ref_fused, ds, total, arith)?;
    let out_bytes = total.saturating_mul(lay.out_row_elems).saturating_mul(8);
    if !lay.batch_major || out_bytes > OUTPUT_BYTES {
        return Ok(None);
    }
    let n_out = ref_fused.outputs.len();
    let mut fetch = ref_fused.outputs.clone();
    fetch.extend(lay.layer_set.iter().cloned());
    let layer_plan = compile(ref_fused, &fetch, arith)?;
    let out_plan = compile(ref_fused, &ref_fused.outputs, arith)?;
    let size = batch_rows(lay.peak_per_row, BATCH);
    let mut ranges = batch_ranges(0, lay.layer_rows, size);
    ranges.extend(batch_ranges(lay.layer_rows, total, size));
    let mut memo = RefMemo {
        rows: total,
        peak_per_row: lay.peak_per_row,
        layer_rows: lay.layer_rows,
        outputs: Vec::new(),
        layers: BTreeMap::new(),
    };
    let run = |r: &Range<usize>| -> Result<Vec<Value>> {
        let plan = if r.end <= lay.layer_rows {
            &layer_plan
        } else {
            &out_plan
        };
        plan.run_values(ds.feeds(plan, r.clone())?)
            .map_err(|e| e.context(format!("reference, rows {}..{}", r.start, r.end)))
    };
    let window = (rayon::current_num_threads() * 2).max(1);
    for chunk in ranges.chunks(window) {
        let parts: Vec<Result<Vec<Value>>> = chunk.par_iter().map(run).collect();
        for (r, part) in chunk.iter().zip(parts) {
            let vals = part?;
            let n = r.len();
            if vals.iter().any(|v| v.shape.first() != Some(&n)) {
                return Ok(None);
            }
            for (k, v) in vals.iter().take(n_out).enumerate() {
                if memo.outputs.len() <= k {
                    memo.outputs.push(MemoOutput {
                        float: v.dtype().is_float(),
                        row_shape: v.shape[1..].to_vec(),
                        values: Vec::with_capacity(total * v.len() / n),
                    });
                }
                let o = &mut memo.outputs[k];
                if o.row_shape != v.shape[1..] {
                    return Ok(None);
                }
                o.values.extend(v.to_f64s()?);
            }
            for (t, v) in lay.layer_set.iter().zip(vals.iter().skip(n_out)) {
                let Buf::F32(x) = &*v.buf else {
                    continue;
                };
                let e = memo
                    .layers
                    .entry(t.to_string())
                    .or_insert_with(|| (v.shape[1..].to_vec(), Vec::new()));
                if e.0 != v.shape[1..] {
                    return Ok(None);
                }
                e.1.extend_from_slice(x);
            }
            inc(n as u64);
        }
    }
    // A tensor that was not float in every batch is not kept.
    memo.layers
        .retain(|_, (s, v)| v.len() == lay.layer_rows * s.iter().product::<usize>());
    Ok(Some(memo))
}

const MAGIC: &[u8] = b"qpipe reference memo 1\n";

fn put_u64(b: &mut Vec<u8>, x: usize) {
    b.extend_from_slice(&(x as u64).to_le_bytes());
}

fn put_shape(b: &mut Vec<u8>, s: &[usize]) {
    put_u64(b, s.len());
    for &d in s {
        put_u64(b, d);
    }
}

/// The memo's bytes in the cache (`None`: the reference cannot be memoized).
pub(crate) fn encode(m: &Option<RefMemo>) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    let Some(m) = m else {
        b.push(0);
        return b;
    };
    b.push(1);
    for x in [m.rows, m.peak_per_row, m.layer_rows, m.outputs.len()] {
        put_u64(&mut b, x);
    }
    for o in &m.outputs {
        b.push(u8::from(o.float));
        put_shape(&mut b, &o.row_shape);
        put_u64(&mut b, o.values.len());
        for v in &o.values {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    put_u64(&mut b, m.layers.len());
    for (name, (shape, v)) in &m.layers {
        put_u64(&mut b, name.len());
        b.extend_from_slice(name.as_bytes());
        put_shape(&mut b, shape);
        put_u64(&mut b, v.len());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    b
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() {
            return Err(Error::msg(
                "the cached reference memo is unreadable (truncated)",
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<usize> {
        let x = u64::from_le_bytes(self.take(8)?.try_into().unwrap_or([0; 8]));
        usize::try_from(x).map_err(|_| Error::msg("the cached reference memo is unreadable"))
    }
    /// A count of items of `size` bytes each, checked against the bytes left.
    fn count(&mut self, size: usize) -> Result<usize> {
        let n = self.u64()?;
        if n.saturating_mul(size.max(1)) > self.b.len() {
            return Err(Error::msg(
                "the cached reference memo is unreadable (a count beyond its size)",
            ));
        }
        Ok(n)
    }
    fn shape(&mut self) -> Result<Vec<usize>> {
        let n = self.count(8)?;
        (0..n).map(|_| self.u64()).collect()
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Option<RefMemo>> {
    let mut r = Reader { b: bytes };
    if r.take(MAGIC.len())? != MAGIC {
        return Err(Error::msg(
            "the cached reference memo is unreadable (format)",
        ));
    }
    if r.u8()? == 0 {
        return Ok(None);
    }
    let (rows, peak_per_row, layer_rows) = (r.u64()?, r.u64()?, r.u64()?);
    let n_out = r.count(1)?;
    let mut outputs = Vec::with_capacity(n_out);
    for _ in 0..n_out {
        let float = r.u8()? != 0;
        let row_shape = r.shape()?;
        let n = r.count(8)?;
        let values = r
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        outputs.push(MemoOutput {
            float,
            row_shape,
            values,
        });
    }
    let n_layers = r.count(1)?;
    let mut layers = BTreeMap::new();
    for _ in 0..n_layers {
        let len = r.count(1)?;
        let name = String::from_utf8_lossy(r.take(len)?).into_owned();
        let shape = r.shape()?;
        let n = r.count(4)?;
        let v = r
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
            .collect();
        layers.insert(name, (shape, v));
    }
    let m = RefMemo {
        rows,
        peak_per_row,
        layer_rows,
        outputs,
        layers,
    };
    let consistent = m
        .outputs
        .iter()
        .all(|o| o.values.len() == rows.saturating_mul(o.row_shape.iter().product()))
        && m.layers
            .values()
            .all(|(s, v)| v.len() == layer_rows.saturating_mul(s.iter().product()));
    if !consistent || layer_rows > rows {
        return Err(Error::msg(
            "the cached reference memo is unreadable (sizes disagree)",
        ));
    }
    Ok(Some(m))
}

/// The reference's memo for rows `[0, total)` of `spec`, computed (by this stage or
/// another one asking at once) or read from the cache; `None` when the pipeline does
/// not know the reference artifact's hash or the reference cannot be memoized. The
/// flag is whether it came from the cache (or another stage) rather than this call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn obtain(
    memo: &dyn Memo,
    input_key: &str,
    ref_fused: &Graph,
    spec: &DatasetSpec,
    ds: &Dataset,
    total: usize,
    runtime: Runtime,
    progress: Option<&crate::progress::Progress>,
) -> Result<(Option<RefMemo>, bool)> {
    let Some(digest) = memo.input_digest(input_key) else {
        return Ok((None, false));
    };
    let mut h = blake3::Hasher::new();
    h.update(b"qpipe reference memo v1\0");
    h.update(&crate::kernels::FLOAT_ARITHMETIC.to_le_bytes());
    h.update(digest.as_bytes());
    h.update(&[0]);
    h.update(&dataset_digest(spec)?);
    h.update(&(total as u64).to_le_bytes());
    h.update(runtime.name().as_bytes());
    if runtime == Runtime::Xnnpack {
        h.update(&[0]);
        h.update(xnnpack_cpu().as_bytes());
    }
    let key = h.finalize().as_bytes().to_vec();
    let mut computed = false;
    let bytes = memo.get_or_compute_shared("reference", &key, &mut || {
        computed = true;
        let bar = progress.map(|p| {
            p.start(
                "running the reference",
                total as u64,
                crate::progress::Unit::Samples,
            )
        });
        let inc = |n: u64| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        };
        let m = compute(ref_fused, ds, total, runtime.arithmetic(), &inc)?;
        if let Some(b) = &bar {
            b.finish();
        }
        Ok(encode(&m))
    })?;
    let m = decode(&bytes)?;
    let cached = !computed && m.is_some();
    if let Some(m) = &m {
        if m.rows != total {
            return Err(Error::msg(
                "the cached reference memo is unreadable (another sample count)",
            ));
        }
    }
    Ok((m, cached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memo_survives_encoding_and_a_truncated_one_is_an_error() {
        let mut layers = BTreeMap::new();
        layers.insert("conv".to_string(), (vec![2], vec![1.5f32, -2.0, 3.0, 0.25]));
        let m = Some(RefMemo {
            rows: 3,
            peak_per_row: 40,
            layer_rows: 2,
            outputs: vec![MemoOutput {
                float: true,
                row_shape: vec![2],
                values: vec![0.1, 0.9, 0.7, 0.3, 0.5, 0.5],
            }],
            layers,
        });
        let b = encode(&m);
        assert_eq!(decode(&b).unwrap(), m);
        assert_eq!(decode(&encode(&None)).unwrap(), None);
        for cut in [0, MAGIC.len(), b.len() / 2, b.len() - 1] {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong = b.clone();
        // The first output's value count (after magic, flag, four u64, float flag and
        // its shape of one dim) claims more values than follow.
        let at = MAGIC.len() + 1 + 32 + 1 + 16;
        wrong[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&wrong).is_err());
    }

    #[test]
    fn slices_of_rows_have_the_batch_shape() {
        let m = RefMemo {
            rows: 3,
            peak_per_row: 0,
            layer_rows: 2,
            outputs: vec![MemoOutput {
                float: false,
                row_shape: vec![],
                values: vec![4.0, 5.0, 6.0],
            }],
            layers: [("t".to_string(), (vec![1, 2], vec![1.0, 2.0, 3.0, 4.0]))].into(),
        };
        assert_eq!(m.output(0, &(1..3)), (vec![2], false, &[5.0, 6.0][..]));
        assert_eq!(
            m.layer("t", &(1..2)),
            Some((vec![1, 1, 2], &[3.0, 4.0][..]))
        );
        assert_eq!(m.layer("t", &(1..3)), None);
        assert_eq!(m.layer("u", &(0..1)), None);
    }
}
