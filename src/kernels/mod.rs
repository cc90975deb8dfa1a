//! The reference interpreter: runs IR graphs on tensors, batch by batch.
//!
//! [`Plan::compile`] resolves each needed node once into a kernel; [`Plan::run_values`]
//! executes it on one batch. Kernels follow TensorFlow's semantics (NHWC, NumPy
//! broadcasting) and compute float32 in float32. Quantization parameters of every
//! step's inputs and outputs travel with the step ([`ops::StepQuant`]) so that
//! integer kernels dispatch on dtype without looking anything up at run time.

pub mod activation;
pub mod array;
mod conv_direct;
mod conv_patches;
pub(crate) mod conv_windows;
pub mod dataset;
pub(crate) mod derived;
pub mod elementwise;
mod fast_binary;
mod float_rows;
pub mod fused;
pub mod int16;
pub mod int8;
pub mod math;
pub mod movement;
pub mod nn;
pub mod ops;
mod pad_rows;
pub mod plan;
pub mod rounding;
pub mod simd;
pub mod spatial;
pub mod value;

pub use dataset::{evaluate, Dataset, EvalOptions, EvalReport};
pub use ops::Arithmetic;
pub use ops::{Kernel, StepQuant};
pub use plan::{run, run_with, Plan, PlanInput};
pub use value::{Buf, Elem, Value};

use crate::error::Result;
use crate::ir::Node;

/// Which float arithmetic the multiply-accumulate kernels (matrix products,
/// convolutions, depthwise) use; every path of every CPU computes the same bits for a
/// given value. 1: a rounded multiply then a rounded add; 2: fused multiply-add (one
/// rounding per step), in the same summation order.
///
/// Float results of the same model and data change with it, and calibration ranges
/// (so int8 models) with them: the calibration statistics' and reference memos' keys
/// and the versions of the stages that run the interpreter
/// ([`float_stage_version`]) include it, so that results cached by a binary with other
/// float arithmetic are recomputed.
pub const FLOAT_ARITHMETIC: u32 = 2;

/// A stage kind's version `base` combined with [`FLOAT_ARITHMETIC`], for the stages
/// whose outputs come from the interpreter's float results: `base` itself under
/// arithmetic 1 (what those stages reported before the constant existed), then
/// `base + 1000 · (FLOAT_ARITHMETIC - 1)`.
pub const fn float_stage_version(base: u32) -> u32 {
    stage_version_under(base, FLOAT_ARITHMETIC)
}

const fn stage_version_under(base: u32, arithmetic: u32) -> u32 {
    base + 1000 * (arithmetic - 1)
}

/// Runs `kernel` on `inputs`: its int16 or int8 form when the step is int8 and one exists,
/// else the generic (float, or dtype-agnostic) one.
pub fn exec_kernel(kernel: &Kernel, inputs: Vec<Value>, quant: &StepQuant) -> Result<Vec<Value>> {
    if let Some(out) = int16::exec(kernel, &inputs, quant)? {
        return Ok(out);
    }
    if let Some(out) = int8::exec(kernel, &inputs, quant)? {
        return Ok(out);
    }
    kernel.exec(inputs, quant)
}

/// Evaluates a single node on given input values (for constant folding).
pub fn eval_node(node: &Node, inputs: Vec<Value>, quant: &StepQuant) -> Result<Vec<Value>> {
    Kernel::compile(node)
        .and_then(|k| exec_kernel(&k, inputs, quant))
        .map_err(|e| e.context(format!("node '{}' ({})", node.name, node.op)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_versions_change_with_the_float_arithmetic() {
        // Arithmetic 1 gives the versions older binaries reported, so they are stale
        // now; no two (base, arithmetic) pairs share a version.
        assert_eq!(stage_version_under(4, 1), 4);
        assert_eq!(
            float_stage_version(4),
            stage_version_under(4, FLOAT_ARITHMETIC)
        );
        let mut seen = std::collections::HashSet::new();
        for arithmetic in 1..=FLOAT_ARITHMETIC {
            for base in 1..100 {
                assert!(seen.insert(stage_version_under(base, arithmetic)));
            }
        }
        assert_ne!(float_stage_version(4), 4);
    }
}
