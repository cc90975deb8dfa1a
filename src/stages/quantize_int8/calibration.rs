//! Calibration: run the float graph on a data set and record every float
//! activation's range and histogram, batch by batch (memory bounded by a window of
//! batches), batches in parallel. The statistics serialize to JSON so that the
//! pipeline can cache them apart from the quantization settings: every `method`
//! derives its ranges from the same statistics ([`Stats::with_method`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ir::{Graph, TensorRef};
use crate::kernels::dataset::{run_batches, Dataset};
use crate::kernels::{Buf, Plan, Value};
use crate::progress::Bar;
use crate::spec::DatasetSpec;

use super::histogram::{Histogram, HALF_BINS};

/// How a tensor's range is derived from what calibration saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Observed minimum and maximum (TFLite's calibrator).
    Minmax,
    /// The central `percentile` % of the values.
    Percentile,
    /// The least squared quantization error over the histogram.
    Mse,
    /// TensorRT's entropy calibration.
    Kl,
    /// Per tensor, the least (outlier-capped) squared error, searched from every
    /// other method's range (see `histogram::auto`).
    Auto,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.serialize(f)
    }
}

/// Range of one tensor over the calibration samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range32 {
    pub min: f32,
    pub max: f32,
}

/// Per-tensor statistics, keyed by tensor name (`node` or `node:k`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub samples: usize,
    pub ranges: BTreeMap<String, Range32>,
    /// Shape of each tensor without its batch dimension (from the first batch).
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Every recorded tensor's histogram.
    #[serde(default)]
    pub histograms: BTreeMap<String, Histogram>,
    /// For the tensors asked for (bias correction's layer inputs): the mean of
    /// each channel (last axis).
    #[serde(default)]
    pub channel_means: BTreeMap<String, Vec<f64>>,
    /// Each row's own [min, max] of each tensor with a batch dimension, for the
    /// first `rows_recorded` rows (bounded by [`ROW_EXTREMES_CAP`]); what `auto`
    /// needs to tell which rows a range clips (see `upstream`).
    #[serde(default)]
    pub row_extremes: BTreeMap<String, Vec<[f32; 2]>>,
    #[serde(default)]
    pub rows_recorded: usize,
    /// The range of each `row_extremes` tensor over the rows after `rows_recorded`.
    #[serde(default)]
    pub tail_ranges: BTreeMap<String, Range32>,
}

/// At most this many (row, tensor) extremes are kept: 2 MiB in memory, a few MiB
/// of cached JSON.
pub const ROW_EXTREMES_CAP: usize = 1 << 18;

impl Stats {
    pub fn get(&self, t: &TensorRef) -> Option<Range32> {
        self.ranges.get(&t.to_string()).copied()
    }

    /// The statistics with each tensor's range replaced by what `method` derives
    /// from its histogram (min/max leaves them as observed).
    pub fn with_method(&self, method: Method, percentile: f64) -> Stats {
        let mut out = self.clone();
        if method == Method::Minmax {
            return out;
        }
        for (k, r) in out.ranges.iter_mut() {
            if let Some(h) = self.histograms.get(k) {
                *r = super::histogram::range(method, percentile, h, *r);
            }
        }
        out
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Stats> {
        serde_json::from_slice(b)
            .map_err(|e| Error::msg(format!("cached calibration statistics are unreadable: {e}")))
    }
}

/// The tensors calibration records: output 0 of every node but constants, and the
/// other outputs that some node reads.
pub(crate) fn calibrated_tensors(g: &Graph) -> Vec<TensorRef> {
    let mut set = std::collections::BTreeSet::new();
    for n in &g.nodes {
        if !n.is_const() {
            set.insert(TensorRef::new(n.name.clone(), 0));
        }
        for r in &n.inputs {
            set.insert(r.clone());
        }
    }
    for r in &g.outputs {
        set.insert(r.clone());
    }
    let consts: std::collections::HashSet<&str> = g
        .nodes
        .iter()
        .filter(|n| n.is_const())
        .map(|n| n.name.as_str())
        .collect();
    set.into_iter()
        .filter(|r| !consts.contains(r.node.as_str()))
        .collect()
}

/// A tensor's range in one batch, its shape without the batch dimension, its
/// histogram, (when asked for) its per-channel sums, and each row's [min, max]
/// (when its leading dimension is the batch's rows).
type Seen = (
    Range32,
    Vec<usize>,
    Histogram,
    Option<ChannelSums>,
    Option<Vec<[f32; 2]>>,
);

/// Per-channel sums of a batch, and the number of values per channel.
type ChannelSums = (Vec<f64>, u64);

/// Min/max and histograms of each fetched float tensor of one batch. NaN or Inf is
/// an error.
fn batch_ranges(
    rows: Range<usize>,
    fetches: &[(TensorRef, bool)],
    outs: Vec<Value>,
) -> Result<Vec<Option<Seen>>> {
    fetches
        .iter()
        .zip(outs)
        .map(|((r, per_channel), v)| {
            let Buf::F32(x) = &*v.buf else {
                return Ok(None);
            };
            let mut lo = f32::INFINITY;
            let mut hi = f32::NEG_INFINITY;
            for (i, &f) in x.iter().enumerate() {
                if !f.is_finite() {
                    return Err(Error::msg(format!(
                        "calibration: tensor '{r}' has {f} (element {i} of rows {}..{}); \
                         the float model produces non-finite activations on this data",
                        rows.start, rows.end
                    )));
                }
                lo = lo.min(f);
                hi = hi.max(f);
            }
            let shape = v.shape.get(1..).map(<[usize]>::to_vec).unwrap_or_default();
            let hist = Histogram::of(x.iter().copied(), HALF_BINS);
            let channels = match (per_channel, v.shape.last()) {
                (true, Some(&c)) if c > 0 => {
                    let mut sums = vec![0f64; c];
                    for (k, &f) in x.iter().enumerate() {
                        sums[k % c] += f as f64;
                    }
                    Some((sums, (x.len() / c) as u64))
                }
                _ => None,
            };
            let per_row = match v.shape.first() {
                Some(&b) if b == rows.len() && b > 0 && !x.is_empty() && x.len() % b == 0 => Some(
                    x.chunks(x.len() / b)
                        .map(|row| {
                            row.iter()
                                .fold([f32::INFINITY, f32::NEG_INFINITY], |[l, h], &f| {
                                    [l.min(f), h.max(f)]
                                })
                        })
                        .collect(),
                ),
                _ => None,
            };
            Ok(Some((
                Range32 { min: lo, max: hi },
                shape,
                hist,
                channels,
                per_row,
            )))
        })
        .collect()
}

/// Runs `graph` on the first `samples` rows of `data` and records the ranges and
/// histograms, and the per-channel means of the tensors in `per_channel`.
pub fn calibrate(
    graph: &Graph,
    data: &DatasetSpec,
    samples: Option<usize>,
    per_channel: &std::collections::BTreeSet<TensorRef>,
    batch_size: usize,
    bar: &dyn Fn(u64) -> Bar,
) -> Result<Stats> {
    let feeds: Vec<&str> = graph.inputs.iter().map(String::as_str).collect();
    let fetches: Vec<(TensorRef, bool)> = calibrated_tensors(graph)
        .into_iter()
        .filter(|r| !feeds.contains(&r.node.as_str()) || r.index == 0)
        .map(|r| {
            let c = per_channel.contains(&r);
            (r, c)
        })
        .collect();
    let refs: Vec<TensorRef> = fetches.iter().map(|f| f.0.clone()).collect();
    let plan = Plan::compile(graph, &feeds, &refs)?;
    let ds = Dataset::open(data)?;
    let total = samples.map_or(ds.rows(), |s| s.min(ds.rows()));
    if samples == Some(0) {
        return Err(Error::usage(
            "calibration: samples = 0 calibrates on nothing; remove it to use every row",
        ));
    }
    if total == 0 {
        return Err(Error::msg("calibration: the data set has no rows"));
    }
    let bar = bar(total as u64);
    let mut sums: BTreeMap<String, ChannelSums> = BTreeMap::new();
    let mut stats = Stats {
        samples: total,
        rows_recorded: total.min(ROW_EXTREMES_CAP / fetches.len().max(1)),
        ..Stats::default()
    };
    // Tensors whose leading dimension was not the batch's rows in some batch.
    let mut no_rows: std::collections::BTreeSet<String> = Default::default();
    run_batches(
        &plan,
        &ds,
        batch_size,
        Some(total),
        |rows, outs| batch_ranges(rows, &fetches, outs),
        |rows, ranges| {
            bar.inc(rows.len() as u64);
            for ((r, _), v) in fetches.iter().zip(ranges) {
                let Some((range, shape, hist, channels, per_row)) = v else {
                    continue;
                };
                let key = r.to_string();
                record_rows(&mut stats, &mut no_rows, &key, rows.clone(), per_row);
                let e = stats.ranges.entry(key.clone()).or_insert(range);
                e.min = e.min.min(range.min);
                e.max = e.max.max(range.max);
                stats
                    .histograms
                    .entry(key.clone())
                    .or_default()
                    .merge(&hist);
                if let Some((ch, n)) = channels {
                    let (all, count) = sums.entry(key.clone()).or_default();
                    if all.is_empty() {
                        all.resize(ch.len(), 0.0);
                    }
                    if all.len() != ch.len() {
                        return Err(Error::msg(format!(
                            "calibration: tensor '{r}' has {} channels in rows {}..{} but {} \
                             before",
                            ch.len(),
                            rows.start,
                            rows.end,
                            all.len()
                        )));
                    }
                    for (a, c) in all.iter_mut().zip(&ch) {
                        *a += c;
                    }
                    *count += n;
                }
                stats.shapes.entry(key).or_insert(shape);
            }
            Ok(())
        },
    )?;
    bar.finish();
    for k in &no_rows {
        stats.row_extremes.remove(k);
        stats.tail_ranges.remove(k);
    }
    for (k, (s, n)) in sums {
        let n = n.max(1) as f64;
        stats
            .channel_means
            .insert(k, s.into_iter().map(|v| v / n).collect());
    }
    Ok(stats)
}

/// Files one batch's per-row extremes of tensor `key` (rows `rows`): the recorded
/// rows' own, the rest folded into its tail range.
fn record_rows(
    stats: &mut Stats,
    no_rows: &mut std::collections::BTreeSet<String>,
    key: &str,
    rows: Range<usize>,
    per_row: Option<Vec<[f32; 2]>>,
) {
    if no_rows.contains(key) {
        return;
    }
    let Some(per_row) = per_row else {
        no_rows.insert(key.to_string());
        return;
    };
    let recorded = stats.rows_recorded;
    let all = stats
        .row_extremes
        .entry(key.to_string())
        .or_insert_with(|| vec![[f32::NAN; 2]; recorded]);
    for (row, e) in rows.zip(per_row) {
        if let Some(slot) = all.get_mut(row) {
            *slot = e;
        } else {
            let t = stats.tail_ranges.entry(key.to_string()).or_insert(Range32 {
                min: e[0],
                max: e[1],
            });
            t.min = t.min.min(e[0]);
            t.max = t.max.max(e[1]);
        }
    }
}

/// blake3 of the files of a data set, in name order (what the calibration cache
/// key needs besides the graph and settings).
pub fn dataset_digest(data: &DatasetSpec) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut hash_file = |label: &str, p: &std::path::Path| -> Result<()> {
        let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
        h.update(label.as_bytes());
        h.update(&[0]);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.update(&[0xff]);
        Ok(())
    };
    for (name, p) in &data.tensors {
        hash_file(name, p)?;
    }
    if let Some(l) = &data.labels {
        hash_file("\u{0}labels", l)?;
    }
    Ok(*h.finalize().as_bytes())
}
