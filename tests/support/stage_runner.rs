//! Running one stage outside a pipeline: an in-memory memo, fixture quantization, and
//! qpipe's interpreter on `.npy` inputs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use qpipe::ir::{Graph, Tensor};
use qpipe::spec::{DatasetSpec, ModelSource, ModelSpec};
use qpipe::stages::{registry, Artifact, ConfigTable, Memo, StageContext, StageOutput};

use super::fixtures::{fixture_datasets, stripped_fixture};

type MemoMap = HashMap<(String, Vec<u8>), Vec<u8>>;

/// A memo that keeps values in memory and counts how often it computed one. Shared
/// values need the upstream artifacts' hashes, which a test gives in `digests`
/// (config key → hash); without them a stage computes what it would share.
#[derive(Default)]
pub struct MemMemo {
    map: Mutex<MemoMap>,
    pub computed: AtomicUsize,
    pub digests: Mutex<HashMap<String, String>>,
    /// How often a shared value was computed.
    pub shared_computed: AtomicUsize,
}

impl Memo for MemMemo {
    fn get_or_compute(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> qpipe::Result<Vec<u8>>,
    ) -> qpipe::Result<Vec<u8>> {
        let k = (name.to_string(), key.to_vec());
        if let Some(v) = self.map.lock().unwrap().get(&k) {
            return Ok(v.clone());
        }
        let v = compute()?;
        self.computed.fetch_add(1, Ordering::SeqCst);
        self.map.lock().unwrap().insert(k, v.clone());
        Ok(v)
    }

    fn input_digest(&self, key: &str) -> Option<String> {
        self.digests.lock().unwrap().get(key).cloned()
    }

    fn get_or_compute_shared(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> qpipe::Result<Vec<u8>>,
    ) -> qpipe::Result<Vec<u8>> {
        let k = (format!("shared {name}"), key.to_vec());
        if let Some(v) = self.map.lock().unwrap().get(&k) {
            return Ok(v.clone());
        }
        let v = compute()?;
        self.shared_computed.fetch_add(1, Ordering::SeqCst);
        self.map.lock().unwrap().insert(k, v.clone());
        Ok(v)
    }
}

impl MemMemo {
    pub fn computed(&self) -> usize {
        self.computed.load(Ordering::SeqCst)
    }
}

/// Runs stage `kind` configured by `config` (TOML) on upstream artifacts.
pub fn run_stage(
    kind: &str,
    config: &str,
    inputs: Vec<(&str, Artifact)>,
    datasets: &BTreeMap<String, DatasetSpec>,
    memo: &dyn Memo,
) -> qpipe::Result<StageOutput> {
    let table = ConfigTable::parse(config).expect("test config is TOML");
    let stage = (registry::factory(kind).expect("registered").build)(&table)
        .unwrap_or_else(|e| panic!("config of {kind}: {e}"));
    let model = ModelSpec {
        source: ModelSource::Graph(PathBuf::from("unused.pb")),
        inputs: vec!["input_x".into()],
        outputs: vec![],
        input_shapes: BTreeMap::new(),
    };
    let ctx = StageContext {
        id: "q",
        model: &model,
        datasets,
        inputs: inputs
            .into_iter()
            .map(|(k, a)| (k.to_string(), Arc::new(a)))
            .collect(),
        memo,
        progress: &qpipe::progress::Progress::disabled(),
    };
    stage.run(&ctx)
}

pub fn graph_of(out: &StageOutput) -> Graph {
    out.artifact.graph().expect("a graph").as_ref().clone()
}

/// A fixture model quantized by the stage with `extra` config lines.
pub fn quantize_fixture(model: &str, extra: &str) -> (Graph, StageOutput) {
    let g = stripped_fixture(model);
    let ds = fixture_datasets(model);
    let memo = MemMemo::default();
    let out = run_stage(
        "quantize_int8",
        &format!("input = \"strip\"\n{extra}"),
        vec![("input", Artifact::Graph(Arc::new(g)))],
        &ds,
        &memo,
    )
    .unwrap_or_else(|e| panic!("{model}: {e}"));
    (graph_of(&out), out)
}

/// Outputs of `g` on a whole `.npy` input file with qpipe's interpreter.
pub fn run_qpipe(g: &Graph, input: &std::path::Path) -> Vec<Tensor> {
    run_qpipe_with(g, input, qpipe::kernels::Arithmetic::Reference)
}

/// [`run_qpipe`] with the int8 kernels in the given arithmetic profile.
pub fn run_qpipe_with(
    g: &Graph,
    input: &std::path::Path,
    arith: qpipe::kernels::Arithmetic,
) -> Vec<Tensor> {
    let x = qpipe::npy::read(input).unwrap();
    qpipe::kernels::run_with(g, &[("input_x", x)], &g.outputs, arith).unwrap()
}
