//! `qpipe compare --html`: one self-contained page (no scripts, no network) with the
//! comparison table, a size-versus-accuracy chart and each int8 variant's per-layer
//! error chart, drawn as inline SVG.

use std::fmt::Write;

use super::{Comparison, Layer, Variant};

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The page. Every variant is a `<tr data-variant=NAME>` of the table and a point of
/// the `data-chart="size-accuracy"` SVG (when it has a size and an accuracy).
pub fn render(c: &Comparison) -> String {
    let mut h = String::new();
    let title = format!("qpipe compare: {}", c.pipeline);
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{}</style>\n</head>\n<body>\n<h1>{}</h1>\n<p class=\"sub\">recipe <code>{}</code></p>",
        esc(&title),
        STYLE,
        esc(&title),
        esc(&c.recipe)
    );
    table(&mut h, c);
    for v in &c.variants {
        if let Some(f) = &v.fallback {
            let _ = writeln!(h, "<p class=\"note\">{}</p>", esc(&f.describe(&v.name)));
        }
    }
    let _ = writeln!(
        h,
        "<p class=\"note\">{}.<br>{}.</p>",
        esc(&c.baseline_note()),
        esc(&c.latency_note())
    );
    h.push_str("<h2>Size and accuracy</h2>\n");
    size_accuracy_chart(&mut h, &c.variants);
    let layered: Vec<(usize, &Variant)> = c
        .variants
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.layers.is_empty())
        .collect();
    if !layered.is_empty() {
        h.push_str("<h2>Per-layer quantization error</h2>\n<p class=\"note\">Signal-to-quantization-noise ratio of each quantized tensor against the float graph on the validation set, worst first; longer is better.</p>\n");
        for (i, v) in layered {
            layer_chart(&mut h, v, PALETTE[i % PALETTE.len()]);
        }
    }
    h.push_str("</body>\n</html>\n");
    h
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}\
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}\
td{white-space:nowrap}th{background:#f4f4f4;vertical-align:bottom;font-weight:600}th span{font-weight:400;color:#555}\
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}\
td:nth-child(-n+2){white-space:normal;overflow-wrap:anywhere;max-width:15em}\
.sub,.note{color:#555;font-size:90%}svg{display:block;margin:1em 0}svg text{font-size:12px;fill:#222}\
svg text.count{font-size:11px;font-weight:700;fill:#fff}.leader{stroke:#999}\
.axis{stroke:#888}.grid{stroke:#eee}";

/// The table's columns: short header, unit, what it means (the header's title).
const COLUMNS: [(&str, &str, &str); 10] = [
    ("variant", "", "the model variant"),
    ("stage", "", "the recipe stage that builds it"),
    (
        "size",
        "KiB",
        "size of the exported file in KiB (1024 bytes)",
    ),
    (
        "size",
        "× float",
        "file size as a fraction of the float32 file",
    ),
    (
        "accuracy",
        "%",
        "accuracy on the validation set, in percent",
    ),
    (
        "drop",
        "pp",
        "accuracy drop against the reference, in percentage points; negative is better",
    ),
    (
        "agree",
        "%",
        "share of samples whose predicted class matches the reference, in percent",
    ),
    (
        "max |err|",
        "output units",
        "largest absolute difference from the reference output",
    ),
    (
        "ops",
        "int8/float",
        "operators computing in int8 / in float",
    ),
    (
        "latency",
        "ms/sample",
        "median milliseconds per sample, batch 1, one thread",
    ),
];

fn table(h: &mut String, c: &Comparison) {
    h.push_str("<table>\n<thead><tr>");
    for (name, unit, title) in COLUMNS {
        if unit.is_empty() {
            let _ = write!(h, "<th title=\"{}\">{}</th>", esc(title), esc(name));
        } else {
            let _ = write!(
                h,
                "<th title=\"{}\">{}<br><span>({})</span></th>",
                esc(title),
                esc(name),
                esc(unit)
            );
        }
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    let dash = || "-".to_string();
    for v in &c.variants {
        let cells = [
            v.name.clone(),
            v.stage.clone(),
            v.bytes
                .map_or_else(dash, |b| format!("{:.1}", b as f64 / 1024.0)),
            v.ratio_to_float.map_or_else(dash, |r| format!("{r:.3}")),
            v.accuracy
                .map_or_else(dash, |a| format!("{:.2}", a * 100.0)),
            v.accuracy_drop
                .map_or_else(dash, |d| format!("{:+.2}", d * 100.0)),
            v.agreement
                .map_or_else(dash, |a| format!("{:.2}", a * 100.0)),
            v.max_abs_error.map_or_else(dash, |e| {
                if e == 0.0 {
                    "0".into()
                } else {
                    format!("{e:.2e}")
                }
            }),
            format!("{}/{}", v.int8_ops, v.float_ops),
            v.ms_per_sample.map_or_else(dash, |t| format!("{t:.3}")),
        ];
        let _ = write!(h, "<tr data-variant=\"{}\">", esc(&v.name));
        for cell in cells {
            let _ = write!(h, "<td>{}</td>", esc(&cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
}

/// An axis-aligned box in chart pixels: x, y (top), width, height.
type Rect = (f64, f64, f64, f64);

fn overlaps(a: Rect, b: Rect) -> bool {
    a.0 < b.0 + b.2 && b.0 < a.0 + a.2 && a.1 < b.1 + b.3 && b.1 < a.1 + a.3
}

/// Width of `text` at the chart's 12px font, on the generous side so that real
/// fonts fit in it.
fn text_width(text: &str) -> f64 {
    7.5 * text.chars().count() as f64 + 4.0
}

/// Where a label of `size` next to a marker at `(x, y)` (radius `r`) fits: the
/// first candidate box, nearest first, that stays inside `area` and meets no box
/// in `taken`. Returns the label's box.
fn place_label(
    x: f64,
    y: f64,
    r: f64,
    size: (f64, f64),
    area: Rect,
    taken: &[Rect],
) -> Option<Rect> {
    let (w, h) = size;
    let mut candidates: Vec<Rect> = Vec::new();
    for step in 0..12 {
        let d = r + 3.0 + 15.0 * step as f64;
        candidates.extend([
            (x + d, y - h / 2.0, w, h),
            (x - d - w, y - h / 2.0, w, h),
            (x - w / 2.0, y - d - h, w, h),
            (x - w / 2.0, y + d, w, h),
            (x + d, y - d - h / 2.0, w, h),
            (x + d, y + d - h / 2.0, w, h),
            (x - d - w, y - d - h / 2.0, w, h),
            (x - d - w, y + d - h / 2.0, w, h),
        ]);
    }
    candidates.into_iter().find(|c| {
        c.0 >= area.0
            && c.1 >= area.1
            && c.0 + c.2 <= area.0 + area.2
            && c.1 + c.3 <= area.1 + area.3
            && !taken.iter().any(|t| overlaps(*c, *t))
    })
}

fn size_accuracy_chart(h: &mut String, variants: &[Variant]) {
    let points: Vec<(usize, &Variant, f64, f64)> = variants
        .iter()
        .enumerate()
        .filter_map(|(i, v)| Some((i, v, v.bytes? as f64 / 1024.0, v.accuracy?)))
        .collect();
    let missing: Vec<&str> = variants
        .iter()
        .filter(|v| v.bytes.is_none() || v.accuracy.is_none())
        .map(|v| v.name.as_str())
        .collect();
    if points.is_empty() {
        h.push_str("<p class=\"note\">No variant has both a file size and an accuracy (export and validate it to chart it).</p>\n");
        return;
    }
    let (w, ht) = (900.0, 420.0);
    let (left, right, top, bottom) = (70.0, 20.0, 20.0, 50.0);
    let x_max = points.iter().map(|p| p.2).fold(0.0, f64::max) * 1.1;
    let (mut y_lo, mut y_hi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.3), hi.max(p.3))
    });
    let pad = ((y_hi - y_lo) * 0.25).max(0.005);
    y_lo = (y_lo - pad).max(0.0);
    y_hi = (y_hi + pad).min(1.0);
    let px = |x: f64| left + (x / x_max) * (w - left - right);
    let py = |y: f64| top + (1.0 - (y - y_lo) / (y_hi - y_lo)) * (ht - top - bottom);
    let _ = writeln!(
        h,
        "<svg data-chart=\"size-accuracy\" width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"file size versus accuracy\">"
    );
    for k in 0..=4 {
        let xv = x_max * k as f64 / 4.0;
        let yv = y_lo + (y_hi - y_lo) * k as f64 / 4.0;
        let _ = writeln!(
            h,
            "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{yb:.1}\"/><text x=\"{x:.1}\" y=\"{yt:.1}\" text-anchor=\"middle\">{xv:.0}</text>\n\
             <line class=\"grid\" x1=\"{left}\" y1=\"{y:.1}\" x2=\"{xr:.1}\" y2=\"{y:.1}\"/><text x=\"{xl:.1}\" y=\"{y4:.1}\" text-anchor=\"end\">{yv:.1}</text>",
            x = px(xv),
            yb = ht - bottom,
            yt = ht - bottom + 16.0,
            y = py(yv),
            xr = w - right,
            xl = left - 6.0,
            y4 = py(yv) + 4.0,
            yv = yv * 100.0,
        );
    }
    let _ = writeln!(
        h,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\"/><line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\"/>\n\
         <text x=\"{xm:.1}\" y=\"{yl}\" text-anchor=\"middle\">file size (KiB)</text>\n\
         <text transform=\"translate(16 {ym:.1}) rotate(-90)\" text-anchor=\"middle\">accuracy (%)</text>",
        yb = ht - bottom,
        xr = w - right,
        xm = (left + w - right) / 2.0,
        yl = ht - 12.0,
        ym = (top + ht - bottom) / 2.0,
    );
    // Points closer than a marker's width would hide each other: they share one
    // marker, which says how many it stands for.
    const R: f64 = 6.0;
    let mut groups: Vec<(f64, f64, Vec<usize>)> = Vec::new();
    for (k, p) in points.iter().enumerate() {
        let (x, y) = (px(p.2), py(p.3));
        match groups
            .iter_mut()
            .find(|g| (g.0 - x).hypot(g.1 - y) < 2.0 * R + 2.0)
        {
            Some(g) => g.2.push(k),
            None => groups.push((x, y, vec![k])),
        }
    }
    let radius = |n: usize| if n > 1 { R + 5.0 } else { R };
    let mut taken: Vec<Rect> = groups
        .iter()
        .map(|(x, y, m)| {
            let r = radius(m.len()) + 1.0;
            (x - r, y - r, 2.0 * r, 2.0 * r)
        })
        .collect();
    let area: Rect = (left + 2.0, 0.0, w - left - 2.0, ht - bottom - 2.0);
    let mut unplaced: Vec<String> = Vec::new();
    for (x, y, members) in &groups {
        let r = radius(members.len());
        let names: Vec<&str> = members.iter().map(|&k| points[k].1.name.as_str()).collect();
        for &k in members {
            let (i, v, xv, yv) = points[k];
            let _ = writeln!(
                h,
                "<g data-variant=\"{name}\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{r}\" fill=\"{color}\"><title>{name}: {xv:.1} KiB, accuracy {acc:.2} %</title></circle></g>",
                name = esc(&v.name),
                color = PALETTE[i % PALETTE.len()],
                acc = yv * 100.0,
            );
        }
        if members.len() > 1 {
            let _ = writeln!(
                h,
                "<text class=\"count\" x=\"{x:.1}\" y=\"{ty:.1}\" text-anchor=\"middle\">×{n}</text>",
                ty = y + 4.0,
                n = members.len()
            );
        }
        // One line per variant at this point.
        let width = names.iter().map(|n| text_width(n)).fold(0.0, f64::max);
        let size = (width, 16.0 * names.len() as f64);
        match place_label(*x, *y, r, size, area, &taken) {
            Some(b) => {
                taken.push(b);
                // A leader line when the label had to move away from its marker.
                let (cx, cy) = (b.0 + b.2 / 2.0, b.1 + b.3 / 2.0);
                if (cx - x).hypot(cy - y) > b.2 / 2.0 + r + 12.0 {
                    let ex = cx.clamp(b.0, b.0 + b.2);
                    let ey = if cy < *y { b.1 + b.3 } else { b.1 };
                    let _ = writeln!(
                        h,
                        "<line class=\"leader\" x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{ex:.1}\" y2=\"{ey:.1}\"/>"
                    );
                }
                let _ = write!(
                    h,
                    "<text class=\"label\" x=\"{tx:.1}\" y=\"{ty:.1}\">",
                    tx = b.0 + 2.0,
                    ty = b.1 + 12.0,
                );
                for (line, name) in names.iter().enumerate() {
                    let _ = write!(
                        h,
                        "<tspan x=\"{tx:.1}\" dy=\"{dy}\">{name}</tspan>",
                        tx = b.0 + 2.0,
                        dy = if line == 0 { 0 } else { 16 },
                        name = esc(name)
                    );
                }
                h.push_str("</text>\n");
            }
            None => unplaced.push(names.join(" = ")),
        }
    }
    h.push_str("</svg>\n");
    if !unplaced.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"note\">Also charted, without room for a label: {}.</p>",
            esc(&unplaced.join("; "))
        );
    }
    if !missing.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"note\">Not charted (no size or no accuracy): {}.</p>",
            esc(&missing.join(", "))
        );
    }
}

fn layer_chart(h: &mut String, v: &Variant, color: &str) {
    const MAX_ROWS: usize = 60;
    let layers: &[Layer] = &v.layers[..v.layers.len().min(MAX_ROWS)];
    let (label_w, bar_w, row_h, top) = (330.0, 380.0, 18.0, 24.0);
    let w = label_w + bar_w + 150.0;
    let ht = top + row_h * layers.len() as f64 + 30.0;
    let finite_max = layers
        .iter()
        .map(|l| l.sqnr_db)
        .filter(|d| d.is_finite())
        .fold(0.0, f64::max)
        .max(1.0);
    let _ = writeln!(
        h,
        "<h3>{name}</h3>\n<svg data-chart=\"layers\" data-variant=\"{name}\" width=\"{w}\" height=\"{ht}\" viewBox=\"0 0 {w} {ht}\" role=\"img\" aria-label=\"per-layer error of {name}\">\n\
         <text x=\"{label_w}\" y=\"14\">SQNR (dB)</text><text x=\"{rx}\" y=\"14\">RMSE / scale</text>",
        name = esc(&v.name),
        rx = label_w + bar_w + 10.0,
    );
    for (k, l) in layers.iter().enumerate() {
        let y = top + row_h * k as f64;
        let db = if l.sqnr_db.is_finite() {
            l.sqnr_db.max(0.0)
        } else {
            finite_max
        };
        let len = bar_w * db / finite_max;
        let name = if l.tensor.chars().count() > 48 {
            let tail: String = l
                .tensor
                .chars()
                .rev()
                .take(47)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("…{tail}")
        } else {
            l.tensor.clone()
        };
        let _ = writeln!(
            h,
            "<g><title>{full} ({op}): SQNR {db:.1} dB, RMSE {rmse:.3e}, scale {scale:.3e}, zero point {zp}</title>\
             <text x=\"{lx:.1}\" y=\"{ty:.1}\" text-anchor=\"end\">{name}</text>\
             <rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{len:.1}\" height=\"{bh:.1}\" fill=\"{color}\"/>\
             <text x=\"{vx:.1}\" y=\"{ty:.1}\">{sq:.1} dB</text><text x=\"{rx:.1}\" y=\"{ty:.1}\">{ros:.3}</text></g>",
            full = esc(&l.tensor),
            op = esc(&l.op),
            db = l.sqnr_db,
            rmse = l.rmse,
            scale = l.scale,
            zp = l.zero_point,
            lx = label_w - 6.0,
            ty = y + row_h * 0.7,
            name = esc(&name),
            bh = row_h - 4.0,
            vx = label_w + len + 4.0,
            sq = l.sqnr_db,
            rx = label_w + bar_w + 60.0,
            ros = l.rmse_over_scale,
        );
    }
    h.push_str("</svg>\n");
    if v.layers.len() > MAX_ROWS {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} more layers are in the JSON output.</p>",
            v.layers.len() - MAX_ROWS
        );
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
