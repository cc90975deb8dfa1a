//! Float kernels of the composites `ir::passes::patterns` fuses (GELU, PReLU,
//! L2 normalization) and the error function, following TFLite's float reference
//! kernels (`reference_ops::Gelu`, `PRelu`, `L2Normalization`).

use super::elementwise::broadcast_map;
use super::value::Value;
use crate::error::{Error, Result};
use crate::ir::DType;

/// The composites a [`super::Kernel::Composite`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Composite {
    /// `0.5·x·(1 + erf(x/√2))`, or with `approximate` the tanh form.
    Gelu { approximate: bool },
    /// `x ≥ 0 ? x : alpha·x` (inputs x, alpha; alpha broadcasts).
    Prelu,
    /// `x / max(‖x‖, 1e-6)` over the last axis.
    L2Normalize,
}

/// TFLite's `L2Normalization` epsilon on the norm (TensorFlow's 1e-12 on its square).
pub const L2_EPSILON: f32 = 1e-6;

/// The error function, to double precision: its Maclaurin series below 2.5, the
/// continued fraction of erfc above (both converge fast there).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let a2 = a * a;
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -a2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            // Converges in under 60 terms below 2.5; the cap only guards the loop.
            if t.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a > 6.0 {
        1.0
    } else {
        // erfc(a) = exp(-a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...)))), evaluated backwards.
        let mut f = a;
        for k in (1..80).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    };
    r.copysign(x)
}

/// TFLite's float GELU (`reference_ops::Gelu`).
pub fn gelu(x: f32, approximate: bool) -> f32 {
    if approximate {
        const K: f32 = 0.797_884_6; // √(2/π)
        0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh())
    } else {
        0.5 * x * (1.0 + erf(f64::from(x) * std::f64::consts::FRAC_1_SQRT_2) as f32)
    }
}

fn float(v: &Value, what: &str) -> Result<()> {
    match v.dtype() {
        DType::F32 => Ok(()),
        d => Err(Error::msg(format!("{what} needs float32, got {d}"))),
    }
}

/// Runs a composite on float32 inputs.
pub fn composite(op: Composite, inputs: &[Value]) -> Result<Value> {
    let x = inputs
        .first()
        .ok_or_else(|| Error::msg(format!("{op:?} needs an input")))?;
    float(x, "the input")?;
    let xs = x.slice::<f32>()?;
    match op {
        Composite::Gelu { approximate } => Ok(Value::from_vec(
            x.shape.clone(),
            xs.iter().map(|&v| gelu(v, approximate)).collect(),
        )),
        Composite::Prelu => {
            let alpha = inputs
                .get(1)
                .ok_or_else(|| Error::msg("PReLU needs an alpha input"))?;
            float(alpha, "PReLU alpha")?;
            let (v, shape) =
                broadcast_map(xs, &x.shape, alpha.slice::<f32>()?, &alpha.shape, |v, a| {
                    if v >= 0.0 {
                        v
                    } else {
                        v * a
                    }
                })?;
            if shape != x.shape {
                return Err(Error::msg(format!(
                    "PReLU alpha of shape {:?} does not broadcast to the input's {:?}",
                    alpha.shape, x.shape
                )));
            }
            Ok(Value::from_vec(shape, v))
        }
        Composite::L2Normalize => {
            let depth = *x
                .shape
                .last()
                .ok_or_else(|| Error::msg("L2 normalization needs rank ≥ 1"))?;
            let mut out = Vec::with_capacity(xs.len());
            if depth > 0 {
                for row in xs.chunks(depth) {
                    let sq: f32 = row.iter().map(|v| v * v).sum();
                    let norm = sq.sqrt().max(L2_EPSILON);
                    out.extend(row.iter().map(|v| v / norm));
                }
            }
            Ok(Value::from_vec(x.shape.clone(), out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // erf at 0.5, 1, 2, 3, 4.5 (to 16 digits).
        let known = [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (4.5, 0.999_999_999_803_383),
        ];
        for (x, want) in known {
            assert!((erf(x) - want).abs() < 1e-13, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-13);
        }
        assert!((erf(2.4999) - erf(2.5001)).abs() < 1e-5);
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(9.0), 1.0);
    }

    #[test]
    fn composites_follow_their_definitions() {
        let x = Value::from_vec(vec![2, 2], vec![3.0f32, -4.0, -1.0, 0.0]);
        let a = Value::from_vec(vec![2], vec![0.5f32, 0.25]);
        let p = composite(Composite::Prelu, &[x.clone(), a]).unwrap();
        assert_eq!(p.slice::<f32>().unwrap(), &[3.0, -1.0, -0.5, 0.0]);
        let n = composite(Composite::L2Normalize, std::slice::from_ref(&x)).unwrap();
        assert_eq!(n.slice::<f32>().unwrap(), &[0.6, -0.8, -1.0, 0.0]);
        let g = composite(
            Composite::Gelu { approximate: false },
            std::slice::from_ref(&x),
        )
        .unwrap();
        let g = g.slice::<f32>().unwrap();
        assert!((g[0] - 2.995_950_2).abs() < 1e-6 && (g[2] + 0.158_655_25).abs() < 1e-6);
        let t = composite(Composite::Gelu { approximate: true }, &[x]).unwrap();
        assert!((t.slice::<f32>().unwrap()[2] + 0.158_808).abs() < 1e-5);
    }
}
