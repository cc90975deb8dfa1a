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

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}\
th:nth-child(-n+2),td:nth-child(-n+2){text-align:left}th{background:#f4f4f4}\
.sub,.note{color:#555;font-size:90%}svg{display:block;margin:1em 0}svg text{font-size:12px;fill:#222}\
.axis{stroke:#888}.grid{stroke:#eee}";

fn table(h: &mut String, c: &Comparison) {
    let rows = c.rows();
    h.push_str("<table>\n<thead><tr>");
    for cell in &rows[0] {
        let _ = write!(h, "<th>{}</th>", esc(cell));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for (v, r) in c.variants.iter().zip(&rows[1..]) {
        let _ = write!(h, "<tr data-variant=\"{}\">", esc(&v.name));
        for cell in r {
            let _ = write!(h, "<td>{}</td>", esc(cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
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
    let (w, ht) = (720.0, 380.0);
    let (left, right, top, bottom) = (70.0, 170.0, 20.0, 50.0);
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
             <line class=\"grid\" x1=\"{left}\" y1=\"{y:.1}\" x2=\"{xr:.1}\" y2=\"{y:.1}\"/><text x=\"{xl:.1}\" y=\"{y4:.1}\" text-anchor=\"end\">{yv:.3}</text>",
            x = px(xv),
            yb = ht - bottom,
            yt = ht - bottom + 16.0,
            y = py(yv),
            xr = w - right,
            xl = left - 6.0,
            y4 = py(yv) + 4.0,
        );
    }
    let _ = writeln!(
        h,
        "<line class=\"axis\" x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\"/><line class=\"axis\" x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\"/>\n\
         <text x=\"{xm:.1}\" y=\"{yl}\" text-anchor=\"middle\">.tflite size (KiB)</text>\n\
         <text transform=\"translate(16 {ym:.1}) rotate(-90)\" text-anchor=\"middle\">accuracy</text>",
        yb = ht - bottom,
        xr = w - right,
        xm = (left + w - right) / 2.0,
        yl = ht - 12.0,
        ym = (top + ht - bottom) / 2.0,
    );
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    for (i, v, x, y) in &points {
        let color = PALETTE[i % PALETTE.len()];
        let tx = px(*x) + 9.0;
        let width = 7.0 * v.name.chars().count() as f64;
        let mut ty = py(*y) + 4.0;
        while placed
            .iter()
            .any(|(px0, py0, w0)| (ty - py0).abs() < 14.0 && tx < px0 + w0 && *px0 < tx + width)
        {
            ty += 14.0;
        }
        placed.push((tx, ty, width));
        let _ = writeln!(
            h,
            "<g data-variant=\"{name}\"><circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"6\" fill=\"{color}\"><title>{name}: {x:.1} KiB, accuracy {y:.4}</title></circle><text x=\"{tx:.1}\" y=\"{ty:.1}\">{name}</text></g>",
            name = esc(&v.name),
            cx = px(*x),
            cy = py(*y),
        );
    }
    h.push_str("</svg>\n");
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
