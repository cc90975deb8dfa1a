//! The fuzz targets' bodies. `tests/fuzz_regressions.rs` includes `targets.rs` too, so
//! the regression inputs run through exactly what the fuzzers ran.

pub mod targets;
