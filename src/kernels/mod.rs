//! The reference interpreter: float32 and int8 kernels over the IR.

pub mod rounding;
