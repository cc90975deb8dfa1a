//! Comparing outputs, and deterministic test data.

use qpipe::ir::Tensor;

/// The largest absolute difference; a NaN on either side counts as infinite.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// [`max_abs_diff`] of two tensors of the same shape.
pub fn tensor_max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "output shapes differ");
    max_abs_diff(&a.to_f32_vec().unwrap(), &b.to_f32_vec().unwrap())
}

pub fn assert_close(got: &Tensor, want: &[f32], tol: f32) {
    let g = got.to_f32_vec().unwrap();
    let d = max_abs_diff(&g, want);
    assert!(
        d <= tol,
        "max abs diff {d} > {tol}\n got {g:?}\nwant {want:?}"
    );
}

/// A deterministic pseudo-random stream for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Fraction of rows (first dimension) whose arg-max agrees.
pub fn top1_agreement(a: &Tensor, b: &Tensor) -> f64 {
    let rows = a.shape()[0];
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let w = a.len() / rows.max(1);
    let same = (0..rows)
        .filter(|&r| argmax(&a[r * w..(r + 1) * w]) == argmax(&b[r * w..(r + 1) * w]))
        .count();
    same as f64 / rows.max(1) as f64
}

/// Number of elements that differ and the largest difference, in units of `lsb`.
pub fn lsb_diff(a: &Tensor, b: &Tensor, lsb: f32) -> (usize, f32) {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    let mut n = 0;
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(&b) {
        if x.to_bits() != y.to_bits() {
            n += 1;
            worst = worst.max((x - y).abs() / lsb);
        }
    }
    (n, worst)
}
