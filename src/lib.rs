//! qpipe: compress TensorFlow models through declarative, cached build pipelines.
//!
//! Data flows `formats` → `ir` ← `stages`; `kernels` run the IR; `pipeline`
//! schedules stages and caches their artifacts, knowing stages only through the
//! [`stages::Stage`] trait.

pub mod cli;
pub mod error;
pub mod formats;
pub mod ir;
pub mod kernels;
pub mod npy;
pub mod pipeline;
pub mod progress;
pub mod stages;

pub use error::{Error, Result};
