//! The `qpipe` command line. Each subcommand is one small function; the stage kinds are
//! passed in (the binary passes [`crate::stages::registry::REGISTRY`]).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::pipeline::store::{short, Store};
use crate::pipeline::{self, Event, Observer, Recipe, RunOptions};
use crate::progress::Progress;
use crate::stages::registry::StageFactory;
use indicatif::MultiProgress;

mod remote;
pub use remote::{PlanArgs, RemoteArgs};

#[derive(Debug, Parser)]
#[command(
    name = "qpipe",
    version,
    about = "Compress TensorFlow models through declarative, cached build pipelines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build what is out of date in a recipe; serve the rest from the cache.
    Run(RunArgs),
    /// List every stage as fresh or stale (and why) without running anything.
    Status(StatusArgs),
    /// Show the stage graph (text, or Graphviz with --dot).
    Graph(GraphArgs),
    /// Inspect and maintain the cache directory.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Summarize a checkpoint, a `.meta`, a frozen `.pb` or a `.tflite` file.
    Inspect(InspectArgs),
    /// Every op qpipe knows: float and int8 kernels, how quantize_int8 treats it, its TFLite builtin.
    Ops(OpsArgs),
    /// Run a built stage's model on a data set with qpipe's interpreter.
    Eval(EvalArgs),
    /// Compare the model variants a recipe builds: size, accuracy, error, ops, time.
    Compare(CompareArgs),
    /// List stages, dependencies, variants and the keys known without building (for CI fan-out).
    Plan(PlanArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompareFormat {
    Table,
    Md,
    Json,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    pub recipe: PathBuf,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = CompareFormat::Table)]
    pub format: CompareFormat,
    /// Also write a self-contained HTML page with charts to this file.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Build what is out of date first (otherwise only the cache is read).
    #[arg(long)]
    pub run: bool,
    /// The data set to time on (default: the one the validate stages use).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Samples to time each variant on (batch 1, one thread); 0 skips the timing.
    #[arg(long, default_value_t = 100)]
    pub latency_samples: usize,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A checkpoint prefix (or its .index/.data/.meta file or directory), a .pb, or a .tflite.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct OpsArgs {
    /// Print the README's Markdown table.
    #[arg(long, conflicts_with = "json")]
    pub markdown: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    pub recipe: PathBuf,
    /// The stage whose model to run (it must have been built by `qpipe run`).
    #[arg(long)]
    pub stage: String,
    /// A `[datasets.NAME]` of the recipe.
    #[arg(long)]
    pub dataset: String,
    /// Only the first N samples.
    #[arg(long)]
    pub samples: Option<usize>,
    /// Write the model's first output to this .npy file (further outputs beside it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Int8 and hybrid arithmetic: `litert-ref` (LiteRT's reference kernels, the same
    /// on every CPU) or `xnnpack` (LiteRT's default interpreter on x86-64; CPU-dependent).
    #[arg(long, default_value = "litert-ref")]
    pub runtime: String,
    /// Show no progress on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    /// Stages to run at once, and threads their kernels share (default: the number of CPUs).
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: Option<u32>,
    /// Print why each stage runs.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print one JSON document on stdout instead of the summary table.
    #[arg(long)]
    pub json: bool,
    /// Print only failures and warnings on stderr: no progress, no per-stage lines.
    #[arg(short, long)]
    pub quiet: bool,
    /// After a failure, keep running what does not depend on it (the default).
    #[arg(long, overrides_with = "fail_fast")]
    pub keep_going: bool,
    /// After a failure, start no further stage.
    #[arg(long, overrides_with = "keep_going")]
    pub fail_fast: bool,
    /// Build shard K of N: every N-th variant (see `qpipe plan`) and what it needs.
    #[arg(long, value_name = "K/N", value_parser = parse_shard, conflicts_with = "only")]
    pub shard: Option<(usize, usize)>,
    /// Build only these stages (ids, or names before matrix expansion) and what they need.
    #[arg(long, value_name = "ID", num_args = 1..)]
    pub only: Vec<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    pipeline::remote::plan::parse_shard(s)
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub recipe: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GraphArgs {
    pub recipe: PathBuf,
    /// Graphviz output.
    #[arg(long)]
    pub dot: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached stage results and sizes.
    Ls(CacheArgs),
    /// Remove everything no recipe's last run references (with RECIPE: also results
    /// of its stages that are no longer in it).
    Gc(CacheArgs),
    /// Rehash every cache file; report and remove corrupt ones (exit code 1 if any).
    Verify(CacheArgs),
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The cache directory (default: $QPIPE_CACHE_DIR, else RECIPE's cache_dir, else ./.qpipe).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Use this recipe's cache directory.
    pub recipe: Option<PathBuf>,
}

/// Runs the command line `args` (including the program name) with the given stage
/// kinds; returns the exit code (0 success, 1 a stage or the work failed, 2 usage or recipe error).
pub fn main(args: Vec<OsString>, registry: &'static [StageFactory]) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match dispatch(cli, registry) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {e}");
            e.exit_code()
        }
    }
}

fn dispatch(cli: Cli, registry: &'static [StageFactory]) -> Result<i32> {
    match cli.command {
        Command::Run(a) => cmd_run(a, registry),
        Command::Status(a) => cmd_status(a, registry),
        Command::Graph(a) => cmd_graph(a, registry),
        Command::Cache(CacheCommand::Ls(a)) => cmd_cache_ls(a, registry),
        Command::Cache(CacheCommand::Gc(a)) => cmd_cache_gc(a, registry),
        Command::Cache(CacheCommand::Verify(a)) => cmd_cache_verify(a, registry),
        Command::Inspect(a) => cmd_inspect(a),
        Command::Ops(a) => cmd_ops(a),
        Command::Eval(a) => cmd_eval(a, registry),
        Command::Compare(a) => cmd_compare(a, registry),
        Command::Plan(a) => remote::cmd_plan(a, registry),
    }
}

fn cmd_inspect(a: InspectArgs) -> Result<i32> {
    let is_tflite = a.path.extension().is_some_and(|e| e == "tflite");
    let keras = a
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("keras") || e.eq_ignore_ascii_case("h5"));
    let sm_dir = if a.path.file_name().is_some_and(|n| n == "saved_model.pb") {
        a.path.parent().map(std::path::Path::to_path_buf)
    } else {
        crate::formats::tf::saved_model::is_saved_model_dir(&a.path).then(|| a.path.clone())
    };
    let (text, json) = if keras {
        return Err(Error::usage(format!(
            "{}: a Keras file, which qpipe does not read; run `model.export(\"DIR\")` in \
             Python and inspect DIR (or name it as saved_model in a recipe)",
            a.path.display()
        )));
    } else if let Some(dir) = sm_dir {
        let s = crate::formats::tf::inspect_saved_model::inspect_saved_model(&dir)?;
        (s.to_string(), s.to_json())
    } else if is_tflite {
        let bytes = crate::error::read_file(&a.path)?;
        let summary = crate::formats::tflite::reader::read(&bytes, &a.path.display().to_string())?;
        (summary.render(), summary.to_json())
    } else {
        use crate::stages::op_support::{model_problems, render_problems};
        let ins = crate::formats::tf::inspect::inspect(&a.path)?;
        let (mut text, mut json) = (ins.to_string(), ins.to_json());
        if let Some(g) = &ins.graph {
            let found = model_problems(&a.path, g);
            text += &render_problems(&found);
            json["graph"]["unsupported_ops"] = found.to_json();
        }
        (text, json)
    };
    if a.json {
        print_stdout(&format!("{json}\n"))?;
    } else {
        print_stdout(&text)?;
    }
    Ok(0)
}

fn cmd_ops(a: OpsArgs) -> Result<i32> {
    use crate::stages::op_support::{every_op, markdown_table};
    let text = if a.markdown {
        markdown_table()
    } else if a.json {
        let ops: Vec<_> = every_op().iter().map(|o| o.to_json()).collect();
        format!("{}\n", serde_json::Value::from(ops))
    } else {
        let mut s = String::new();
        for o in every_op() {
            let problems = o.problems();
            s += &format!(
                "{:24} {}\n",
                o.name,
                if problems.is_empty() {
                    "runs, quantizes and exports".to_string()
                } else {
                    problems.join("; ")
                }
            );
        }
        s
    };
    print_stdout(&text)?;
    Ok(0)
}

/// CPU time (user + system, every thread) this process has used, where the system
/// says (Linux: `/proc/self/stat`, in its 1/100 s ticks).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

fn cmd_eval(a: EvalArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let arithmetic = crate::stages::validate::Runtime::parse(&a.runtime)
        .map_err(|e| Error::usage(format!("--runtime: {e}")))?
        .arithmetic();
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let recipe_name = a.recipe.display();
    let idx = recipe
        .stages
        .iter()
        .position(|s| s.id == a.stage)
        .ok_or_else(|| {
            let ids: Vec<&str> = recipe.stages.iter().map(|s| s.id.as_str()).collect();
            Error::usage(format!(
                "{recipe_name}: no stage '{}' (stages: {})",
                a.stage,
                ids.join(", ")
            ))
        })?;
    let spec = recipe.datasets.get(&a.dataset).ok_or_else(|| {
        let names: Vec<&str> = recipe.datasets.keys().map(String::as_str).collect();
        Error::usage(format!(
            "{recipe_name}: no dataset '{}' (datasets: {})",
            a.dataset,
            names.join(", ")
        ))
    })?;
    let entry = pipeline::cached_results(&recipe)?
        .into_iter()
        .nth(idx)
        .flatten()
        .ok_or_else(|| {
            let hint = pipeline::lastrun::why_not_built(&recipe)
                .unwrap_or_else(|| format!("run `qpipe run {recipe_name}` first"));
            Error::msg(format!(
                "stage '{}' is not built (or is stale); {hint}",
                a.stage
            ))
        })?;
    let artifact = pipeline::load_artifact(&recipe, &entry.artifact)?;
    let graph = artifact.graph().ok_or_else(|| {
        Error::usage(format!(
            "stage '{}' produces a report, not a model",
            a.stage
        ))
    })?;
    let opts = crate::kernels::EvalOptions {
        samples: a.samples,
        outputs_npy: a.out.clone(),
        arithmetic,
        progress: if show_progress(a.quiet || a.json) {
            Progress::stderr(&a.stage)
        } else {
            Progress::disabled()
        },
        ..Default::default()
    };
    let (started, cpu_started) = (std::time::Instant::now(), process_cpu_seconds());
    let report = crate::kernels::evaluate(graph, spec, &opts)
        .map_err(|e| e.context(format!("stage '{}' on dataset '{}'", a.stage, a.dataset)))?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu_started.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    if a.json {
        let doc = serde_json::json!({
            "stage": a.stage,
            "dataset": a.dataset,
            "samples": report.samples,
            "accuracy": report.accuracy,
            "correct": report.correct,
            "written": report.written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
        });
        print_stdout(&format!("{doc}\n"))?;
    } else {
        let mut text = format!(
            "stage {} on {}: {} samples",
            a.stage, a.dataset, report.samples
        );
        if let Some(acc) = report.accuracy {
            text.push_str(&format!(
                ", accuracy {:.4} ({} correct)",
                acc, report.correct
            ));
        }
        text.push('\n');
        for p in &report.written {
            text.push_str(&format!("wrote {}\n", p.display()));
        }
        print_stdout(&text)?;
    }
    Ok(0)
}

fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| Error::msg(format!("cannot write to stdout: {e}")))
}

fn cmd_run(a: RunArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let mut opts = RunOptions {
        fail_fast: a.fail_fast,
        remote: a.remote.open(&recipe)?,
        only: pipeline::remote::select_stages(&recipe, a.shard, &a.only)?,
        ..RunOptions::default()
    };
    if let Some(j) = a.jobs {
        opts.jobs = j as usize;
        // Stages running at once share one pool of kernel threads; --jobs caps it too,
        // so that the run uses at most that many cores. (Fails only if the pool was
        // already started, and then it keeps its size.)
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(j as usize)
            .build_global();
    }
    let observer = Terminal::new(a.verbose, a.quiet, a.json);
    let report = pipeline::run(&recipe, &opts, &observer)?;
    if a.json {
        print_stdout(&format!("{}\n", report.to_json()))?;
    } else {
        let mut text = report.summary_table();
        if let Some(r) = &report.remote {
            text.push_str(&remote::summary_line(r));
        }
        print_stdout(&text)?;
    }
    Ok(if report.ok { 0 } else { 1 })
}

fn cmd_compare(a: CompareArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let remote = a.remote.open(&recipe)?;
    if a.run {
        let opts = RunOptions {
            remote: remote.clone(),
            ..RunOptions::default()
        };
        let report = pipeline::run(&recipe, &opts, &Terminal::new(false, false, false))?;
        if !report.ok {
            let failed = report.with_status(pipeline::StageStatus::Failed);
            return Err(Error::msg(format!(
                "{}: the run failed ({}); nothing to compare",
                a.recipe.display(),
                failed.join(", ")
            )));
        }
    }
    remote::pull_for_reading(&recipe, remote.as_deref())?;
    let opts = pipeline::compare::CompareOptions {
        dataset: a.dataset.clone(),
        latency_samples: a.latency_samples,
    };
    let c = pipeline::compare::compare(&recipe, &opts)?;
    if let Some(path) = &a.html {
        let page = pipeline::compare::html::render(&c);
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        pipeline::fsutil::write_atomic(dir, path, page.as_bytes(), &|| {})?;
    }
    let text = match a.format {
        CompareFormat::Table => c.render_text(),
        CompareFormat::Md => c.render_markdown(),
        CompareFormat::Json => format!("{}\n", c.to_json()),
    };
    print_stdout(&text)?;
    Ok(0)
}

fn cmd_status(a: StatusArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let report = pipeline::status(&recipe)?;
    if a.json {
        print_stdout(&format!("{}\n", report.to_json()))?;
    } else {
        print_stdout(&report.render())?;
    }
    Ok(0)
}

fn cmd_graph(a: GraphArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = Recipe::load_with(&a.recipe, registry)?;
    let dag = pipeline::dag::Dag::new(&recipe);
    let text = if a.dot {
        dag.render_dot(&recipe)
    } else {
        dag.render_text(&recipe)
    };
    print_stdout(&text)?;
    Ok(0)
}

fn cache_dir(a: &CacheArgs, recipe: Option<&Recipe>) -> PathBuf {
    if let Some(d) = &a.cache_dir {
        return d.clone();
    }
    if let Some(r) = recipe {
        return r.cache_dir.clone();
    }
    if let Some(d) = std::env::var_os("QPIPE_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    PathBuf::from(".qpipe")
}

fn cache_recipe(a: &CacheArgs, registry: &'static [StageFactory]) -> Result<Option<Recipe>> {
    a.recipe
        .as_ref()
        .map(|r| Recipe::load_with(r, registry))
        .transpose()
}

fn existing_store(dir: &Path) -> Result<Store> {
    let store = Store::at(dir);
    if !store.exists() {
        return Err(Error::usage(format!(
            "{}: no qpipe cache here",
            dir.display()
        )));
    }
    Ok(store)
}

fn cmd_cache_ls(a: CacheArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = cache_recipe(&a, registry)?;
    let store = existing_store(&cache_dir(&a, recipe.as_ref()))?;
    let l = store.listing();
    let mut rows = vec![["PIPELINE", "STAGE", "KIND", "KEY", "SIZE"]
        .map(String::from)
        .to_vec()];
    for s in &l.stages {
        rows.push(vec![
            s.pipeline.clone(),
            s.stage.clone(),
            s.kind.clone(),
            short(&s.key).to_string(),
            if s.present {
                human_bytes(s.bytes)
            } else {
                "gone".into()
            },
        ]);
    }
    let mut text = format!("cache {}\n", l.root.display());
    text.push_str(&pipeline::report::table(&rows));
    text.push_str(&format!(
        "{} blobs, {}; {} stage results ({} not referenced by any recipe's last run); {} memo entries\n",
        l.objects,
        human_bytes(l.object_bytes),
        l.actions,
        l.unreferenced_actions,
        l.memo
    ));
    print_stdout(&text)?;
    Ok(0)
}

fn cmd_cache_gc(a: CacheArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = cache_recipe(&a, registry)?;
    let store = existing_store(&cache_dir(&a, recipe.as_ref()))?;
    let ids: BTreeSet<String> = recipe
        .iter()
        .flat_map(|r| r.stages.iter().map(|s| s.id.clone()))
        .collect();
    let current = recipe.as_ref().map(|r| (r.name.as_str(), &ids));
    let r = store.gc(current)?;
    print_stdout(&format!(
        "kept {} stage results; removed {} stage results ({} of stages gone from the recipe), {} blobs ({} files, {})\n",
        r.kept_actions,
        r.removed_actions,
        r.dropped_refs,
        r.removed_objects,
        r.removed_files,
        human_bytes(r.removed_bytes)
    ))?;
    Ok(0)
}

fn cmd_cache_verify(a: CacheArgs, registry: &'static [StageFactory]) -> Result<i32> {
    let recipe = cache_recipe(&a, registry)?;
    let store = existing_store(&cache_dir(&a, recipe.as_ref()))?;
    let r = store.verify()?;
    let mut text = String::new();
    for c in &r.corrupt {
        text.push_str(&format!("corrupt (removed): {c}\n"));
    }
    text.push_str(&format!(
        "checked {} blobs, {} stage results, {} memo entries, {} refs: {} corrupt\n",
        r.objects,
        r.actions,
        r.memo,
        r.refs,
        r.corrupt.len()
    ));
    print_stdout(&text)?;
    Ok(if r.corrupt.is_empty() { 0 } else { 1 })
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Whether to draw progress bars: only on a terminal, and not under `--quiet`,
/// `--json` or `CI` (set to anything).
fn show_progress(quiet: bool) -> bool {
    !quiet && std::env::var_os("CI").is_none() && std::io::stderr().is_terminal()
}

/// Progress on stderr: one line per stage event and bars for long work on a
/// terminal; failures, warnings and (with `-v`) rebuild reasons always.
struct Terminal {
    verbose: bool,
    tty: bool,
    /// The bars of the stages running now, when they are shown.
    bars: Option<MultiProgress>,
}

impl Terminal {
    fn new(verbose: bool, quiet: bool, json: bool) -> Self {
        Terminal {
            verbose,
            tty: !quiet && std::io::stderr().is_terminal(),
            bars: show_progress(quiet || json).then(crate::progress::stderr_bars),
        }
    }

    fn line(&self, text: &str) {
        let write = || {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{text}");
        };
        // Printed above the bars, which are then redrawn below it.
        match &self.bars {
            Some(m) => m.suspend(write),
            None => write(),
        }
    }
}

impl Observer for Terminal {
    fn event(&self, e: Event<'_>) {
        match e {
            Event::Dirty { id, reason } if self.verbose => {
                self.line(&format!("[dirty]   {id}: {reason}"))
            }
            Event::Dirty { .. } => {}
            Event::Running { id } if self.tty => self.line(&format!("running   {id}")),
            Event::Cached { id } if self.tty || self.verbose => {
                self.line(&format!("cached    {id}"))
            }
            Event::Ran { id, seconds } if self.tty || self.verbose => {
                self.line(&format!("done      {id} ({seconds:.2}s)"))
            }
            Event::Failed { id, error } => {
                // The error starts with `stage 'ID': `; the line names the stage once.
                let error = error
                    .strip_prefix(&format!("stage '{id}': "))
                    .unwrap_or(error);
                self.line(&format!("FAILED    {id}: {error}"))
            }
            Event::Skipped { id, reason } if self.tty || self.verbose => {
                self.line(&format!("skipped   {id}: {reason}"))
            }
            Event::Restored { id, path } if self.tty || self.verbose => {
                self.line(&format!("restored  {} (from {id})", path.display()))
            }
            Event::Warning(w) => self.line(&format!("warning: {w}")),
            _ => {}
        }
    }

    fn progress(&self, id: &str) -> Progress {
        match &self.bars {
            Some(m) => Progress::new(m, id),
            None => Progress::disabled(),
        }
    }
}
