//! TFLite flatbuffers: lowering the IR to TFLite operators, writing `.tflite`
//! files, and reading them back for inspection.

pub mod lower;
pub mod model;
pub mod reader;
pub mod versions;
pub mod writer;

/// Rust code flatc 23.5.26 generated from `proto/tflite/schema.fbs`
/// (regenerate with `proto/tflite/regen.sh`).
#[allow(
    clippy::all,
    dead_code,
    unused_imports,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unsafe_op_in_unsafe_fn,
    mismatched_lifetime_syntaxes
)]
#[rustfmt::skip]
mod schema_generated;

pub use schema_generated::tflite as schema;

use crate::error::Result;
use crate::ir::Graph;

/// Lowers `graph` and writes it as `.tflite` bytes.
pub fn export(graph: &Graph) -> Result<(model::Model, Vec<u8>)> {
    let model = lower::lower(graph)?;
    let bytes = writer::write(&model)?;
    Ok((model, bytes))
}
