//! Recipes, the stage DAG, fingerprints and the artifact cache, and explanations of freshness.
//!
//! [`recipe`] parses a recipe into stages; [`dag`] orders them; [`run`] schedules them
//! on worker threads, where the engine keys each by [`fingerprint`] (read that module's
//! docs for what a key covers and why), serves hits from [`store`] or builds, and the
//! persister stores what was built; [`status`] reads the cache without running;
//! [`explain`] says why a stage is stale.

mod artifact_codec;
pub mod compare;
pub mod cycle;
pub mod dag;
mod engine;
pub mod explain;
pub mod filehash;
pub mod fingerprint;
pub mod fsutil;
pub mod lastrun;
pub mod outdir;
mod persist;
pub mod recipe;
pub mod recipe_check;
pub mod remote;
pub mod report;
pub mod run;
pub mod status;
pub mod store;

pub use recipe::Recipe;
pub use report::{RunReport, StageReport, StageStatus, StatusReport};
pub use run::{run, Event, Observer, RunOptions, Silent};
pub use status::{cached_results, load_artifact, status};
