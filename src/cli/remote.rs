//! The command line of the remote cache: `--remote-cache`, `--no-remote-upload`, and
//! `qpipe plan`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::error::Result;
use crate::pipeline::remote::{self, Remote, Settings};
use crate::pipeline::Recipe;
use crate::stages::registry::StageFactory;

#[derive(Debug, Args, Clone, Default)]
pub struct RemoteArgs {
    /// A shared cache over HTTP (Bazel's /ac/ + /cas/ layout); overrides
    /// $QPIPE_REMOTE_CACHE and the recipe's remote_cache.
    #[arg(long, value_name = "URL")]
    pub remote_cache: Option<String>,
    /// Read from the remote cache but upload nothing (also: QPIPE_REMOTE_UPLOAD=0).
    #[arg(long)]
    pub no_remote_upload: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub recipe: PathBuf,
    /// Print JSON (stages, dependencies, keys known without building, variants).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub(super) fn warn(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "warning: {text}");
}

impl RemoteArgs {
    /// The remote a command uses, if any.
    pub fn open(&self, recipe: &Recipe) -> Result<Option<Arc<Remote>>> {
        let settings = Settings::resolve(
            self.remote_cache.as_deref(),
            recipe.remote_cache.as_deref(),
            self.no_remote_upload,
            &warn,
        )?;
        Ok(settings.map(|s| Arc::new(Remote::new(s))))
    }
}

pub(super) fn cmd_plan(a: PlanArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let remote = a.remote.open(&recipe)?;
    let plan = remote::plan(&recipe, remote.as_deref(), &warn)?;
    let text = if a.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&plan.doc).unwrap_or_default()
        )
    } else {
        plan.render()
    };
    super::print_stdout(&text)?;
    Ok(0)
}

/// The closing line of `qpipe run` with a remote cache.
pub(super) fn summary_line(r: &serde_json::Value) -> String {
    let mb = |k: &str| r[k].as_u64().unwrap_or(0) as f64 / 1e6;
    format!(
        "remote cache {}{}: {} hits, {} uploads, {:.1} MB down, {:.1} MB up{}\n",
        r["url"].as_str().unwrap_or("?"),
        if r["upload"] == true {
            ""
        } else {
            " (read-only)"
        },
        r["hits"],
        r["uploads"],
        mb("bytes_downloaded"),
        mb("bytes_uploaded"),
        if r["available"] == true {
            ""
        } else {
            "; turned off after a failure"
        }
    )
}

/// Before `compare` reads the cache: fetch from the remote what the local cache lacks.
pub(super) fn pull_for_reading(recipe: &Recipe, remote: Option<&Remote>) -> Result<()> {
    if let Some(r) = remote {
        remote::pull(recipe, Some(r), true, &warn)?;
    }
    Ok(())
}
