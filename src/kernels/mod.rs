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
