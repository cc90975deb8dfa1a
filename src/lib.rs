//! qpipe: compress TensorFlow models through declarative, cached build pipelines.
//!
//! Each layer imports only those to its left: `ir` ← {`formats`, `kernels`} ←
//! `stages` ← `pipeline` ← `cli`, with [`spec`] (the recipe's model and data set files)
//! below `formats`, `kernels` and `stages`. `kernels` run the IR; `pipeline` schedules
//! stages and caches their artifacts, knowing stages only through the
//! [`stages::Stage`] trait and the registry.

pub mod cli;
pub mod error;
pub mod formats;
pub mod ir;
pub mod kernels;
pub mod npy;
pub mod pipeline;
pub mod progress;
pub mod spec;
pub mod stages;

pub use error::{Error, Result};
