//! One function per fuzz target: feeds arbitrary bytes to a parser of outside input
//! and to what qpipe does next with a successful parse. Any outcome but a panic, a
//! hang or a huge allocation is fine: errors are the expected answer to bad input.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use qpipe::formats::tf::checkpoint::{index_filename, Bundle};
use qpipe::formats::tf::proto::BundleHeaderProto;
use qpipe::formats::tf::sstable::{self, Table, BLOCK_TRAILER_LEN, FOOTER_LEN};
use qpipe::formats::tf::{crc32c, graph_def, meta_graph, saved_model, snappy};
use qpipe::ir::Graph;

/// The all-dtypes checkpoint (strings, partitioned variables, two shards).
pub const DTYPES_INDEX: &[u8] = include_bytes!("../../../fixtures/dtypes/best_validation.index");
pub const DTYPES_SHARDS: [&[u8]; 2] = [
    include_bytes!("../../../fixtures/dtypes/best_validation.data-00000-of-00002"),
    include_bytes!("../../../fixtures/dtypes/best_validation.data-00001-of-00002"),
];

/// Header shard counts above this are passed one shard (an error path) to keep the
/// per-input cost small.
const MAX_FUZZ_SHARDS: usize = 64;

fn prefix() -> &'static Path {
    Path::new("fuzz/best_validation")
}

fn read_every_tensor(bundle: &Bundle) {
    let keys: Vec<String> = bundle.keys().map(str::to_string).collect();
    for k in keys {
        if let Ok(t) = bundle.read(&k) {
            assert_eq!(t.shape(), bundle.entry(&k).unwrap().shape.as_slice());
        }
    }
}

/// Rewrites the trailer crc of the block at `offset` (`size` bytes) if it lies in the file.
fn fix_block_crc(data: &mut [u8], offset: u64, size: u64, blocks_end: usize) -> Option<Vec<u8>> {
    let off = usize::try_from(offset).ok()?;
    let size = usize::try_from(size).ok()?;
    let end = off.checked_add(size)?;
    if end.checked_add(BLOCK_TRAILER_LEN)? > blocks_end {
        return None;
    }
    let kind = data[end];
    let crc = crc32c::mask(crc32c::extend(crc32c::value(&data[off..end]), &[kind]));
    data[end + 1..end + 5].copy_from_slice(&crc.to_le_bytes());
    match kind {
        0 => Some(data[off..end].to_vec()),
        1 => snappy::decompress(&data[off..end], 1 << 20).ok(),
        _ => None,
    }
}

/// The input with every block crc the footer and index block lead to made right, so
/// mutations reach the block and entry parsers instead of stopping at a checksum.
fn with_fixed_crcs(data: &[u8]) -> Option<Vec<u8>> {
    let mut data = data.to_vec();
    let blocks_end = data.len().checked_sub(FOOTER_LEN)?;
    let footer = data[blocks_end..blocks_end + 40].to_vec();
    let mut pos = 0;
    let mut handles = [(0, 0); 2];
    for h in &mut handles {
        *h = (
            sstable::varint64(&footer, &mut pos).ok()?,
            sstable::varint64(&footer, &mut pos).ok()?,
        );
    }
    fix_block_crc(&mut data, handles[0].0, handles[0].1, blocks_end);
    let index = fix_block_crc(&mut data, handles[1].0, handles[1].1, blocks_end)?;
    for (_, value) in sstable::parse_block(&index).ok()? {
        if let Ok(h) = sstable::parse_handle(&value) {
            fix_block_crc(&mut data, h.offset, h.size, blocks_end);
        }
    }
    Some(data)
}

/// A checkpoint `.index` file: the table, the bundle header and every entry, then a
/// read of every tensor from the all-dtypes fixture's data shards. The input is tried
/// as it is and with its block checksums made right.
pub fn checkpoint_index(data: &[u8]) {
    open_index(data);
    if let Some(fixed) = with_fixed_crcs(data) {
        open_index(&fixed);
    }
}

fn open_index(data: &[u8]) {
    let Ok(table) = Table::parse(&index_filename(prefix()), data) else {
        return;
    };
    let shards = table
        .entries
        .first()
        .and_then(|(_, v)| BundleHeaderProto::decode(v.as_slice()).ok())
        .and_then(|h| usize::try_from(h.num_shards).ok())
        .filter(|&n| n <= MAX_FUZZ_SHARDS)
        .unwrap_or(1);
    let shards = (0..shards)
        .map(|i| DTYPES_SHARDS.get(i).map_or(Vec::new(), |s| s.to_vec()))
        .collect();
    if let Ok(bundle) = Bundle::from_bytes(prefix(), data, shards) {
        read_every_tensor(&bundle);
    }
}

/// A checkpoint's `.data` shards under the all-dtypes fixture's index: the input is
/// both shards back to back, split where the fixture's first shard ends.
pub fn checkpoint_data(data: &[u8]) {
    let cut = DTYPES_SHARDS[0].len().min(data.len());
    let shards = vec![data[..cut].to_vec(), data[cut..].to_vec()];
    if let Ok(bundle) = Bundle::from_bytes(prefix(), DTYPES_INDEX, shards) {
        read_every_tensor(&bundle);
    }
}

/// What stages do with an imported graph before anything op-specific.
fn use_graph(mut g: Graph) {
    let _ = g.topo_order();
    let _ = qpipe::ir::shape_infer::infer_shapes(&g);
    let _ = qpipe::ir::serialize::decode(&qpipe::ir::serialize::encode(&g));
    let _ = graph_def::graph_to_bytes(&g);
    if let Some(last) = g.nodes.last().map(|n| n.name.clone()) {
        let _ = graph_def::extract_sub_graph(&mut g, &[&last]);
    }
}

/// A binary GraphDef (`.pb`) imported into the IR.
pub fn graph_def(data: &[u8]) {
    let Ok(gd) = graph_def::decode_graph_def(data) else {
        return;
    };
    if let Ok(g) = graph_def::graph_from_proto(&gd) {
        use_graph(g);
    }
}

/// A MetaGraphDef (`.meta`) imported into the IR.
pub fn meta_graph(data: &[u8]) {
    if let Ok(m) = meta_graph::meta_graph_from_bytes(data) {
        use_graph(m.graph);
    }
}

/// A `saved_model.pb`: decoded, its MetaGraphDef picked, and every signature's graph
/// built (calls inlined, inputs and outputs named by the keys) against a checkpoint
/// object graph that gives every node a key, so that variable mapping runs too.
pub fn saved_model(data: &[u8]) {
    use qpipe::formats::tf::proto::trackable_object_graph::{
        trackable_object::SerializedTensor, TrackableObject,
    };
    let Ok(sm) = saved_model::decode_saved_model(data) else {
        return;
    };
    let _ = saved_model::select_meta_graph(sm.clone(), &["serve".to_string()]);
    for mg in &sm.meta_graphs {
        let Ok(sigs) = saved_model::signatures(mg) else {
            continue;
        };
        let nodes = mg
            .object_graph_def
            .as_ref()
            .map_or(0, |o| o.nodes.len())
            .min(10_000);
        let ckpt = qpipe::formats::tf::proto::TrackableObjectGraph {
            nodes: (0..nodes)
                .map(|i| TrackableObject {
                    children: Vec::new(),
                    attributes: vec![SerializedTensor {
                        name: "VARIABLE_VALUE".into(),
                        full_name: String::new(),
                        checkpoint_key: format!("v{i}"),
                    }],
                })
                .collect(),
        };
        for sig in sigs {
            let mut load = || Ok(ckpt.clone());
            if let Ok(u) = saved_model::signature_graph(mg, &sig.name, &[], &mut load) {
                use_graph(u.graph);
            }
        }
    }
}

/// A `.npy` file.
pub fn npy(data: &[u8]) {
    if let Ok(t) = qpipe::npy::decode(data, Path::new("fuzz.npy")) {
        let _ = t.to_f64_vec();
        if let Ok(back) = qpipe::npy::encode(&t) {
            let again = qpipe::npy::decode(&back, Path::new("fuzz.npy")).expect("re-decodes");
            assert_eq!(again.shape(), t.shape());
        }
    }
    // The header against a file that is longer or shorter than the bytes at hand.
    for len in [0, data.len() as u64 / 2, u64::MAX] {
        let _ = qpipe::npy::parse_header(data, len);
    }
}

/// The repository root: relative paths in the fuzzed recipe resolve against
/// `recipes/`, so `../fixtures/...` finds the real fixtures.
fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let m = Path::new(env!("CARGO_MANIFEST_DIR"));
        if m.join("recipes").is_dir() {
            m.to_path_buf()
        } else {
            m.join("../..")
        }
    })
}

/// A recipe (TOML text, parsed strictly with the built-in stage kinds).
pub fn recipe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = repo_root().join("recipes").join("fuzz.toml");
    if let Ok(r) =
        qpipe::pipeline::recipe::Recipe::parse(text, &path, qpipe::stages::registry::REGISTRY)
    {
        for i in 0..r.stages.len() {
            let _ = r.external_files(i);
        }
    }
}

/// A `.tflite` file as `qpipe inspect` reads it.
pub fn tflite(data: &[u8]) {
    if let Ok(m) = qpipe::formats::tflite::reader::read(data, "fuzz.tflite") {
        let _ = m.render();
        let _ = m.to_json();
        let _ = m.op_histogram();
        let _ = m.constant_bytes();
        for r in m.buffers.iter().flatten() {
            assert!(r.end <= data.len());
        }
    }
}
