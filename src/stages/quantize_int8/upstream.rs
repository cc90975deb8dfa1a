//! `auto`'s second step: ranges consistent with what the int8 model computes.
//!
//! Calibration runs the float model, so a tensor's statistics include what the
//! rows that an upstream range clips produce in float. The int8 model never
//! produces those values: once the input of a glitched row is clipped, the row's
//! hidden activations and logits are ordinary ones. When `auto` clips such rows
//! at one tensor and keeps min/max downstream, the downstream range is set by
//! values that cannot occur, and every ordinary value there loses resolution. On
//! q16_outlier_inputs the logits kept [-102, 53] (scale 0.61, against typical
//! logits of ±1) for the 1 % of calibration rows whose input it had clipped.
//!
//! So, in topological order, a tensor's range is narrowed to the extremes of the
//! rows that no range upstream of it clips grossly. A row is clipped grossly at
//! a tensor when one of its values lies beyond the tensor's range (widened to
//! hold 0) by more than the range's width: clipping takes more than half of that
//! value away, so the row's float values downstream say little about the int8
//! model's. The margin keeps rows that a range trims only at its tail: their
//! downstream values are nearly the float ones and must stay representable.
//! And such rows must be rare (at most one in [`RARE`]): rare events, such as a
//! glitch or a saturated sensor, are what makes a row's float values atypical.
//! When a range clips many rows that far, it is cutting the tensor's own long
//! tail (conv_bn's second ReLU keeps 0.52 of 4.17, which 165 of its 200
//! calibration rows exceed twice over), and the float values downstream of those
//! rows are still the best estimate there is; narrowing to the few rows left
//! would fit the range to them.
//! A range is only ever narrowed, never widened; a tensor whose rows are all
//! excluded keeps its range. Under min/max no range clips a calibration row, so
//! nothing changes, and rows beyond [`calibration::ROW_EXTREMES_CAP`] count with
//! their whole range (never excluded), which can only keep a range wider.
//!
//! Everything comes from the memoized statistics (each row's own extremes), so
//! choosing `auto` does not run the model again.

use std::collections::HashMap;

use super::calibration::{Range32, Stats};
use crate::error::{Error, Result};
use crate::ir::Graph;

/// Narrows `stats`' ranges as above; returns the tensors narrowed, in
/// topological order, with their old and new ranges.
pub fn narrow(g: &Graph, stats: &mut Stats) -> Result<Vec<(String, Range32, Range32)>> {
    let rows = stats.rows_recorded;
    let mut narrowed = Vec::new();
    if rows == 0 || stats.row_extremes.is_empty() {
        return Ok(narrowed);
    }
    let order = g
        .topo_order()
        .map_err(|e| Error::msg(format!("auto calibration: {e}")))?;
    let mut outputs: HashMap<&str, Vec<String>> = HashMap::new();
    for key in stats.row_extremes.keys() {
        let node = key.rsplit_once(':').map_or(key.as_str(), |(n, _)| n);
        outputs.entry(node).or_default().push(key.clone());
    }
    // Per node: the rows excluded at its outputs (clipped at or above its inputs).
    let mut excluded: HashMap<&str, Vec<bool>> = HashMap::new();
    for i in order {
        let n = &g.nodes[i];
        let mut ex = vec![false; rows];
        for input in &n.inputs {
            if let Some(up) = excluded.get(input.node.as_str()) {
                or_into(&mut ex, up);
            }
            let key = input.to_string();
            if let (Some(r), Some(e)) = (stats.ranges.get(&key), stats.row_extremes.get(&key)) {
                let c = clipped_grossly(*r, e);
                if c.iter().filter(|&&x| x).count() * RARE <= rows {
                    or_into(&mut ex, &c);
                }
            }
        }
        if ex.iter().any(|&x| x) {
            for key in outputs.get(n.name.as_str()).into_iter().flatten() {
                let (Some(e), Some(r)) = (stats.row_extremes.get(key), stats.ranges.get(key))
                else {
                    continue;
                };
                let Some(mut clean) = kept_extremes(e, &ex) else {
                    continue;
                };
                if let Some(t) = stats.tail_ranges.get(key) {
                    clean.min = clean.min.min(t.min);
                    clean.max = clean.max.max(t.max);
                }
                let new = Range32 {
                    min: r.min.max(clean.min),
                    max: r.max.min(clean.max),
                };
                if new != *r {
                    narrowed.push((key.clone(), *r, new));
                    stats.ranges.insert(key.clone(), new);
                }
            }
        }
        excluded.insert(n.name.as_str(), ex);
    }
    Ok(narrowed)
}

/// Rows clipped grossly at a tensor are excluded downstream only when they are at
/// most one in `RARE` of the calibration rows.
const RARE: usize = 20;

fn or_into(acc: &mut [bool], other: &[bool]) {
    for (a, &o) in acc.iter_mut().zip(other) {
        *a |= o;
    }
}

/// The rows with a value beyond `r` (widened to hold 0) by more than its width.
fn clipped_grossly(r: Range32, rows: &[[f32; 2]]) -> Vec<bool> {
    let (lo, hi) = (r.min.min(0.0) as f64, r.max.max(0.0) as f64);
    let w = hi - lo;
    rows.iter()
        .map(|&[mn, mx]| w > 0.0 && ((mx as f64) > hi + w || (mn as f64) < lo - w))
        .collect()
}

/// The extremes over the rows not excluded; `None` when every row is.
fn kept_extremes(rows: &[[f32; 2]], excluded: &[bool]) -> Option<Range32> {
    rows.iter()
        .zip(excluded)
        .filter(|(_, &x)| !x)
        .map(|(&[mn, mx], _)| Range32 { min: mn, max: mx })
        .reduce(|a, b| Range32 {
            min: a.min.min(b.min),
            max: a.max.max(b.max),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{Op, Unary};
    use crate::ir::{Node, TensorRef};

    /// x -> h -> y, 40 calibration rows: row k has x in [-1, 1] and h, y in
    /// [0, 1 + k/40], except the rows in `glitch`, whose x reaches `glitch_x` and
    /// whose h and y reach 50.
    fn chain(glitch: &[usize], glitch_x: f32, x_range: Range32) -> (Graph, Stats) {
        let g = Graph {
            nodes: vec![
                Node::new("x", Op::Placeholder.name()),
                Node::new("h", Op::Unary(Unary::Relu).name()).with_input(TensorRef::new("x", 0)),
                Node::new("y", Op::Unary(Unary::Relu).name()).with_input(TensorRef::new("h", 0)),
            ],
            inputs: vec!["x".into()],
            ..Graph::default()
        };
        let rows = 40;
        let mut stats = Stats {
            samples: rows,
            rows_recorded: rows,
            ..Stats::default()
        };
        let x: Vec<[f32; 2]> = (0..rows)
            .map(|k| [-1.0, if glitch.contains(&k) { glitch_x } else { 1.0 }])
            .collect();
        let h: Vec<[f32; 2]> = (0..rows)
            .map(|k| {
                [
                    0.0,
                    if glitch.contains(&k) {
                        50.0
                    } else {
                        1.0 + k as f32 / 40.0
                    },
                ]
            })
            .collect();
        stats.ranges.insert("x".into(), x_range);
        stats.row_extremes.insert("x".into(), x);
        for t in ["h", "y"] {
            stats.ranges.insert(
                t.into(),
                Range32 {
                    min: 0.0,
                    max: 50.0,
                },
            );
            stats.row_extremes.insert(t.into(), h.clone());
        }
        (g, stats)
    }

    const CLIPPED_X: Range32 = Range32 {
        min: -1.0,
        max: 1.0,
    };

    #[test]
    fn rows_clipped_far_upstream_no_longer_set_the_ranges_downstream() {
        let (g, mut stats) = chain(&[7, 39], 200.0, CLIPPED_X);
        let n = narrow(&g, &mut stats).unwrap();
        let want = Range32 {
            min: 0.0,
            max: 1.0 + 38.0 / 40.0,
        };
        assert_eq!(stats.ranges["h"], want);
        assert_eq!(stats.ranges["y"], want);
        assert_eq!(stats.ranges["x"], CLIPPED_X);
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn rows_trimmed_at_the_tail_or_unclipped_keep_the_ranges() {
        // x = 2.5 lies beyond [-1, 1] by less than its width (2): trimmed, kept.
        let (g, mut stats) = chain(&[7], 2.5, CLIPPED_X);
        assert!(narrow(&g, &mut stats).unwrap().is_empty());
        assert_eq!(stats.ranges["h"].max, 50.0);
        // Min/max at x clips nothing.
        let (g, mut stats) = chain(
            &[7],
            200.0,
            Range32 {
                min: -1.0,
                max: 200.0,
            },
        );
        assert!(narrow(&g, &mut stats).unwrap().is_empty());
    }

    #[test]
    fn rows_clipped_that_are_not_rare_or_not_recorded_keep_the_ranges() {
        // Three rows of 40 is more than one in twenty.
        let (g, mut stats) = chain(&[1, 2, 3], 200.0, CLIPPED_X);
        assert!(narrow(&g, &mut stats).unwrap().is_empty());
        // Rows after the recorded ones count with their whole range.
        let (g, mut stats) = chain(&[7], 200.0, CLIPPED_X);
        stats
            .tail_ranges
            .insert("h".into(), Range32 { min: 0.0, max: 9.0 });
        narrow(&g, &mut stats).unwrap();
        assert_eq!(stats.ranges["h"], Range32 { min: 0.0, max: 9.0 });
    }

    #[test]
    fn a_range_is_never_widened() {
        let (g, mut stats) = chain(&[7], 200.0, CLIPPED_X);
        stats
            .ranges
            .insert("y".into(), Range32 { min: 0.0, max: 1.5 });
        narrow(&g, &mut stats).unwrap();
        assert_eq!(stats.ranges["y"], Range32 { min: 0.0, max: 1.5 });
    }
}
