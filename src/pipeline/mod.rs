//! Recipes, the stage DAG, fingerprints and the artifact cache, and explanations of freshness.
//!
//! [`recipe`] parses a recipe into stages; [`dag`] orders them; [`run`] executes them,
//! keying each by [`fingerprint`] (read that module's docs for what a key covers and
//! why) and serving hits from [`store`]; [`explain`] says why a stage is stale.

pub mod canon;
pub mod compare;
pub mod dag;
pub mod explain;
pub mod filehash;
pub mod fingerprint;
pub mod fsutil;
pub mod lastrun;
pub mod outdir;
pub mod recipe;
pub mod recipe_check;
pub mod report;
pub mod run;
pub mod store;

pub use recipe::Recipe;
pub use report::{RunReport, StageReport, StageStatus, StatusReport};
pub use run::{cached_results, load_artifact, run, status, Event, Observer, RunOptions, Silent};
