//! The graph IR every stage reads and writes. It depends on nothing else in the crate.

mod dtype;
mod graph;
pub mod op;
pub mod passes;
pub mod serialize;
pub mod shape_infer;
mod tensor;

pub use dtype::DType;
pub use graph::{Attr, Graph, Node, TensorRef, LOOP_OPS};
pub use op::{FusedActivation, Op};
pub use tensor::{filled_buffer, num_elements, Element, QuantParams, Tensor, TensorData};

/// An error raised by the IR itself: a malformed graph, tensor or serialized form.
#[derive(Debug, Clone, PartialEq)]
pub struct IrError(String);

impl IrError {
    pub fn new(msg: impl Into<String>) -> IrError {
        IrError(msg.into())
    }
}

impl std::fmt::Display for IrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IrError {}
