//! The checkpoint reader against checkpoints TensorFlow 2.21 wrote (fixtures/), and
//! against corrupted copies of them.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use qpipe::formats::tf::checkpoint::{
    decode_slice_key, encode_slice_key, resolve_prefix, Bundle, Extent, Slice,
};
use qpipe::formats::tf::crc32c;
use qpipe::formats::tf::proto::{BundleEntryProto, BundleHeaderProto};
use qpipe::formats::tf::sstable::{parse_block, parse_handle, Table, FOOTER_LEN, TABLE_MAGIC};
use qpipe::ir::{DType, Tensor};
use serde_json::Value;

// ------------------------------------------------------------------------------------
// helpers

fn fixtures() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    assert!(
        p.join("dtypes").is_dir(),
        "checkpoint fixtures are missing at {}",
        p.display()
    );
    p
}

/// Every fixture checkpoint: (name, prefix).
fn fixture_prefixes() -> Vec<(&'static str, PathBuf)> {
    let f = fixtures();
    let mut out: Vec<(&str, PathBuf)> = ["push_student", "conv_bn", "mlp_res", "dtypes"]
        .into_iter()
        .map(|m| (m, f.join(m).join("best_validation")))
        .collect();
    out.push(("dtypes/tf2ckpt", f.join("dtypes/tf2ckpt/ckpt")));
    for (name, p) in &out {
        let index = PathBuf::from(format!("{}.index", p.display()));
        assert!(
            index.is_file(),
            "fixture {name}: {} is missing",
            index.display()
        );
    }
    out
}

fn json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_json(prefix: &Path, name: &str) -> Value {
    json(&prefix.parent().unwrap().join(name))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn base64(s: &str) -> Vec<u8> {
    const ALPHA: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHA.iter().position(|&a| a == c).expect("base64 digit") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A fresh copy of a fixture checkpoint's files in a scratch directory.
fn scratch_copy(test: &str, fixture: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("checkpoint-tests")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join(fixture);
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("best_validation.") && !name.ends_with(".meta") {
            fs::copy(e.path(), dir.join(&name)).unwrap();
        }
    }
    dir.join("best_validation")
}

fn index_of(prefix: &Path) -> PathBuf {
    PathBuf::from(format!("{}.index", prefix.display()))
}

fn shard_of(prefix: &Path, s: usize, n: usize) -> PathBuf {
    PathBuf::from(format!("{}.data-{s:05}-of-{n:05}", prefix.display()))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn append_block(file: &mut Vec<u8>, contents: &[u8]) -> (u64, u64) {
    let h = (file.len() as u64, contents.len() as u64);
    file.extend_from_slice(contents);
    file.push(0);
    let crc = crc32c::extend(crc32c::value(contents), &[0]);
    file.extend_from_slice(&crc32c::mask(crc).to_le_bytes());
    h
}

fn block(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut restarts = Vec::new();
    for (k, v) in entries {
        restarts.push(out.len() as u32);
        put_varint(&mut out, 0);
        put_varint(&mut out, k.len() as u64);
        put_varint(&mut out, v.len() as u64);
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }
    if restarts.is_empty() {
        restarts.push(0);
    }
    for r in &restarts {
        out.extend_from_slice(&r.to_le_bytes());
    }
    out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
    out
}

/// An uncompressed one-data-block table (what TF writes for small bundles).
fn build_table(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut file = Vec::new();
    let data = append_block(&mut file, &block(entries));
    let meta = append_block(&mut file, &block(&[]));
    let mut handle = Vec::new();
    put_varint(&mut handle, data.0);
    put_varint(&mut handle, data.1);
    let last = entries.last().unwrap().0.clone();
    let index = append_block(&mut file, &block(&[(last, handle)]));
    let mut footer = Vec::new();
    for (o, s) in [meta, index] {
        put_varint(&mut footer, o);
        put_varint(&mut footer, s);
    }
    footer.resize(40, 0);
    footer.extend_from_slice(&TABLE_MAGIC.to_le_bytes());
    file.extend(footer);
    file
}

/// Rewrites `<prefix>.index` after `edit` changed the decoded entries.
fn rewrite_index(
    prefix: &Path,
    edit: impl FnOnce(&mut BundleHeaderProto, &mut BTreeMap<Vec<u8>, BundleEntryProto>),
) {
    let path = index_of(prefix);
    let table = Table::open(&path).unwrap();
    let mut header = BundleHeaderProto::decode(table.entries[0].1.as_slice()).unwrap();
    let mut entries: BTreeMap<Vec<u8>, BundleEntryProto> = table.entries[1..]
        .iter()
        .map(|(k, v)| (k.clone(), BundleEntryProto::decode(v.as_slice()).unwrap()))
        .collect();
    edit(&mut header, &mut entries);
    let mut all = vec![(Vec::new(), header.encode_to_vec())];
    all.extend(entries.into_iter().map(|(k, e)| (k, e.encode_to_vec())));
    fs::write(&path, build_table(&all)).unwrap();
}

fn edit_entry(prefix: &Path, key: &str, f: impl FnOnce(&mut BundleEntryProto)) {
    rewrite_index(prefix, |_, entries| {
        f(entries.get_mut(key.as_bytes()).expect("key in fixture"))
    });
}

/// (offset, size) of every block the footer and index block point to: index first.
fn block_handles(file: &[u8]) -> Vec<(usize, usize)> {
    let footer = &file[file.len() - FOOTER_LEN..];
    let mut p = 0;
    let mut varint = |buf: &[u8]| {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = buf[p];
            p += 1;
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return v as usize;
            }
        }
    };
    let _meta = (varint(footer), varint(footer));
    let index = (varint(footer), varint(footer));
    let mut out = vec![index];
    for (_, h) in parse_block(&file[index.0..index.0 + index.1]).unwrap() {
        let h = parse_handle(&h).unwrap();
        out.push((h.offset as usize, h.size as usize));
    }
    out
}

fn refresh_crc(file: &mut [u8], (o, s): (usize, usize)) {
    let crc = crc32c::extend(crc32c::value(&file[o..o + s]), &[file[o + s]]);
    file[o + s + 1..o + s + 5].copy_from_slice(&crc32c::mask(crc).to_le_bytes());
}

#[track_caller]
fn assert_err_mentions<T: std::fmt::Debug>(r: qpipe::Result<T>, wants: &[&str]) -> String {
    let msg = r.expect_err("expected an error").to_string();
    for w in wants {
        assert!(msg.contains(w), "expected {w:?} in error: {msg}");
    }
    msg
}

fn dtype_of(name: &str) -> DType {
    DType::from_name(name).unwrap_or_else(|| panic!("unknown dtype name {name}"))
}

fn check_tensor(what: &str, t: &Tensor, want: &Value) {
    assert_eq!(
        t.dtype(),
        dtype_of(want["dtype"].as_str().unwrap()),
        "{what}"
    );
    let shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(t.shape(), shape.as_slice(), "{what}");
    if let Some(b64) = want.get("strings_b64") {
        let strings: Vec<Vec<u8>> = b64
            .as_array()
            .unwrap()
            .iter()
            .map(|s| base64(s.as_str().unwrap()))
            .collect();
        assert_eq!(
            t.strings().expect("string tensor"),
            strings.as_slice(),
            "{what}"
        );
    } else {
        assert_eq!(
            blake3::hash(t.bytes()).to_hex().as_str(),
            want["blake3"].as_str().unwrap(),
            "{what}: blake3 of the raw little-endian bytes"
        );
    }
}

// ------------------------------------------------------------------------------------
// reading what TensorFlow wrote

#[test]
fn index_tables_hold_exactly_the_keys_tensorflow_wrote() {
    for (name, prefix) in fixture_prefixes() {
        let table = Table::open(&index_of(&prefix)).unwrap();
        let dump = fixture_json(&prefix, "index_dump.json");
        let want: Vec<Vec<u8>> = dump["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| hex(e["key_hex"].as_str().unwrap()))
            .collect();
        let keys: Vec<Vec<u8>> = table.entries.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys[0], b"", "{name}: header first");
        assert_eq!(&keys[1..], want.as_slice(), "{name}");
    }
}

#[test]
fn every_fixture_tensor_matches_what_tensorflow_read() {
    let mut total = 0;
    for (name, prefix) in fixture_prefixes() {
        let bundle = Bundle::open(&prefix).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = fixture_json(&prefix, "expected_tensors.json");
        let expected = expected.as_object().unwrap();
        let keys: Vec<&str> = bundle.keys().collect();
        let want_keys: Vec<&str> = expected.keys().map(String::as_str).collect();
        assert_eq!(keys, want_keys, "{name}: tensor names");
        assert_eq!(bundle.unsupported().count(), 0, "{name}");
        for (key, want) in expected {
            assert!(bundle.contains(key));
            let t = bundle.read(key).unwrap_or_else(|e| panic!("{name}: {e}"));
            check_tensor(&format!("{name}/{key}"), &t, want);
            let info = bundle.entry(key).unwrap();
            assert_eq!(info.dtype, t.dtype());
            assert_eq!(info.shape, t.shape());
            total += 1;
        }

        // Entry metadata agrees with TF's own decoding of the index.
        let dump = fixture_json(&prefix, "index_dump.json");
        assert_eq!(
            bundle.num_shards() as u64,
            dump["header"]["num_shards"].as_u64().unwrap()
        );
        for e in dump["entries"].as_array().unwrap() {
            let Some(key) = e.get("key").and_then(Value::as_str) else {
                continue;
            };
            let info = bundle.entry(key).unwrap();
            if e.get("slices").is_some() {
                assert!(!info.slices.is_empty(), "{name}/{key}");
                continue;
            }
            assert_eq!(info.shard as u64, e["shard_id"].as_u64().unwrap(), "{key}");
            assert_eq!(info.offset, e["offset"].as_u64().unwrap(), "{key}");
            assert_eq!(info.size, e["size"].as_u64().unwrap(), "{key}");
            assert_eq!(
                u64::from(info.crc32c),
                e["crc32c"].as_u64().unwrap(),
                "{key}"
            );
        }
    }
    assert!(total > 40, "only {total} tensors checked");
}

#[test]
fn dtypes_fixture_two_shards_and_partitioned_variable() {
    let prefix = fixtures().join("dtypes/best_validation");
    let b = Bundle::open(&prefix).unwrap();
    assert_eq!(b.num_shards(), 2);
    assert!(!b.is_big_endian());
    let shards: std::collections::BTreeSet<usize> = b
        .keys()
        .map(|k| b.entry(k).unwrap())
        .filter(|e| e.slices.is_empty())
        .map(|e| e.shard)
        .collect();
    assert_eq!(shards, [0, 1].into());

    let info = b.entry("partitioned").unwrap();
    let full = |start, len| Extent {
        start,
        length: Some(len),
    };
    assert_eq!(
        info.slices,
        [
            Slice {
                extents: vec![full(0, 3), full(0, 3)]
            },
            Slice {
                extents: vec![full(3, 3), full(0, 3)]
            }
        ]
    );
    let t = b.read("partitioned").unwrap();
    let want: Vec<f32> = (0..18).map(|i| i as f32 * 0.5 - 2.0).collect();
    assert_eq!(t.shape(), [6, 3]);
    assert_eq!(t.values::<f32>().unwrap(), want);

    // The slice keys TF wrote decode to the slices and re-encode byte for byte.
    let dump = fixture_json(&prefix, "index_dump.json");
    let mut seen = 0;
    for e in dump["entries"].as_array().unwrap() {
        if let Some(d) = e.get("slice_key_decoded") {
            let key = hex(e["key_hex"].as_str().unwrap());
            let (name, slice) = decode_slice_key(&key).unwrap();
            assert_eq!(name, d["name"].as_str().unwrap());
            let dims: Vec<(i64, i64)> = d["dims_start_length"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_i64().unwrap(), p[1].as_i64().unwrap()))
                .collect();
            let got: Vec<(i64, i64)> = slice
                .extents
                .iter()
                .map(|x| (x.start, x.length.unwrap_or(-1)))
                .collect();
            assert_eq!(got, dims);
            assert_eq!(encode_slice_key(&name, &slice), key);
            seen += 1;
        }
    }
    assert_eq!(seen, 2);

    // Values of several dtypes, beyond the hash check.
    assert_eq!(
        b.read("i32_scalar").unwrap().values::<i32>().unwrap(),
        [-123456789]
    );
    assert_eq!(
        b.read("i64_2d").unwrap().values::<i64>().unwrap(),
        [i64::MIN, -1, 1 << 40, i64::MAX]
    );
    assert_eq!(b.read("bool_2d").unwrap().bytes(), [1, 0, 1, 0, 0, 1]);
    let s = b.read("str_vec").unwrap();
    assert_eq!(s.strings().unwrap()[3], b"a\x00b\xff");
}

#[test]
fn tf2_object_checkpoint() {
    let prefix = fixtures().join("dtypes/tf2ckpt/ckpt");
    let b = Bundle::open(&prefix).unwrap();
    assert!(b.contains("_CHECKPOINTABLE_OBJECT_GRAPH"));
    let x = b.read("x/.ATTRIBUTES/VARIABLE_VALUE").unwrap();
    assert_eq!(x.values::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(
        b.read("step/.ATTRIBUTES/VARIABLE_VALUE")
            .unwrap()
            .values::<i64>()
            .unwrap(),
        [42]
    );
    let g = b.read("_CHECKPOINTABLE_OBJECT_GRAPH").unwrap();
    assert_eq!(g.shape(), [] as [usize; 0]);
    assert!(g.strings().unwrap()[0].len() > 100);
}

#[test]
fn prefixes_resolve_from_directory_and_index_path() {
    let dir = fixtures().join("conv_bn");
    assert_eq!(resolve_prefix(&dir).unwrap(), dir.join("best_validation"));
    assert_eq!(
        resolve_prefix(&dir.join("best_validation.index")).unwrap(),
        dir.join("best_validation")
    );
    assert_eq!(
        resolve_prefix(&dir.join("best_validation")).unwrap(),
        dir.join("best_validation")
    );
    assert_err_mentions(Bundle::open(&dir.join("nope")), &["nope.index"]);
}

// ------------------------------------------------------------------------------------
// corrupted copies

#[test]
fn truncated_index() {
    let prefix = scratch_copy("truncated_index", "dtypes");
    let index = index_of(&prefix);
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..30]).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "truncated"],
    );
    // Cutting off the tail leaves some other 8 bytes where the magic number should be.
    fs::write(&index, &bytes[..bytes.len() - 1]).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "bad magic"],
    );
}

#[test]
fn bad_footer_magic() {
    let prefix = scratch_copy("bad_footer_magic", "dtypes");
    let index = index_of(&prefix);
    let mut bytes = fs::read(&index).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x10;
    fs::write(&index, bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "not an sstable (bad magic number"],
    );
}

#[test]
fn block_crc_mismatch_names_the_block() {
    let prefix = scratch_copy("block_crc", "dtypes");
    let index = index_of(&prefix);
    let good = fs::read(&index).unwrap();
    let handles = block_handles(&good);
    let (o, s) = handles[1];
    let mut bytes = good.clone();
    bytes[o + s / 2] ^= 0x01;
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            &format!("data block at offset {o} (size {s})"),
            "block crc mismatch",
        ],
    );
    // The same for the index block.
    let (io, is) = handles[0];
    let mut bytes = good.clone();
    bytes[io] ^= 0x01;
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            &format!("index block at offset {io} (size {is})"),
            "block crc mismatch",
        ],
    );
}

#[test]
fn bad_block_type() {
    let prefix = scratch_copy("bad_block_type", "dtypes");
    let index = index_of(&prefix);
    let mut bytes = fs::read(&index).unwrap();
    let (o, s) = block_handles(&bytes)[1];
    bytes[o + s] = 2;
    refresh_crc(&mut bytes, (o, s));
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            "data block at offset",
            "bad block type 2",
        ],
    );
}

#[test]
fn block_handle_outside_the_file() {
    let prefix = scratch_copy("handle_outside", "dtypes");
    let index = index_of(&prefix);
    let mut bytes = fs::read(&index).unwrap();
    let n = bytes.len();
    // Keep the metaindex handle (two varints), replace the index handle.
    let old = &bytes[n - FOOTER_LEN..];
    let meta_len = 1 + old
        .iter()
        .enumerate()
        .filter(|(_, &b)| b < 0x80)
        .nth(1)
        .unwrap()
        .0;
    let mut footer = old[..meta_len].to_vec();
    for v in [1u64 << 33, 100] {
        put_varint(&mut footer, v);
    }
    footer.resize(40, 0);
    bytes[n - FOOTER_LEN..n - 8].copy_from_slice(&footer);
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            "index block at offset 8589934592",
            "outside the file",
        ],
    );
}

#[test]
fn overflowing_varints_and_bad_restart_arrays() {
    let prefix = scratch_copy("varints_restarts", "dtypes");
    let index = index_of(&prefix);
    let good = fs::read(&index).unwrap();
    let (o, s) = block_handles(&good)[1];

    // The first entry's `shared` varint becomes 6 continuation bytes: > 32 bits.
    let mut bytes = good.clone();
    bytes[o..o + 6].copy_from_slice(&[0xff; 6]);
    refresh_crc(&mut bytes, (o, s));
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "data block at offset", "varint"],
    );

    // More restarts than the block can hold.
    let mut bytes = good.clone();
    bytes[o + s - 4..o + s].copy_from_slice(&u32::MAX.to_le_bytes());
    refresh_crc(&mut bytes, (o, s));
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            "data block at offset",
            "restart array out of range",
        ],
    );

    // A restart point beyond the entries.
    let mut bytes = good.clone();
    bytes[o + s - 8..o + s - 4].copy_from_slice(&(s as u32).to_le_bytes());
    refresh_crc(&mut bytes, (o, s));
    fs::write(&index, &bytes).unwrap();
    assert_err_mentions(Bundle::open(&prefix), &["restart array out of range"]);

    // A varint inside an entry proto that overflows 64 bits.
    fs::write(&index, &good).unwrap();
    let table = Table::open(&index).unwrap();
    let mut entries = table.entries.clone();
    let i = entries.iter().position(|(k, _)| k == b"f32_3d").unwrap();
    entries[i].1 = [&[0x20u8][..], &[0xff; 10]].concat(); // offset: 10-byte varint
    fs::write(&index, build_table(&entries)).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            "\"f32_3d\"",
            "not a BundleEntryProto",
        ],
    );
}

#[test]
fn tensor_crc_mismatch_names_shard_and_tensor() {
    let prefix = scratch_copy("tensor_crc", "dtypes");
    let b = Bundle::open(&prefix).unwrap();
    let info = b.entry("f32_3d").unwrap().clone();
    let shard = shard_of(&prefix, info.shard, 2);
    let mut data = fs::read(&shard).unwrap();
    data[info.offset as usize + 5] ^= 0x20;
    fs::write(&shard, &data).unwrap();
    assert_err_mentions(
        b.read("f32_3d"),
        &[
            "best_validation.data-00000-of-00002",
            "\"f32_3d\"",
            "crc32c mismatch",
        ],
    );
    // Neighbours in the same shard are unaffected.
    b.read("f16_vec").unwrap();
    b.read("f64_scalar").unwrap();

    // A string tensor: its length checksum, then its bytes.
    let info = b.entry("str_vec").unwrap().clone();
    let shard = shard_of(&prefix, info.shard, 2);
    let mut data = fs::read(&shard).unwrap();
    let o = info.offset as usize;
    data[o] ^= 0x01; // first length
    fs::write(&shard, &data).unwrap();
    assert_err_mentions(
        b.read("str_vec"),
        &[
            "best_validation.data-00001-of-00002",
            "\"str_vec\"",
            "string length checksum mismatch",
        ],
    );
    data[o] ^= 0x01;
    data[o + info.size as usize - 1] ^= 0x01; // last string byte
    fs::write(&shard, &data).unwrap();
    assert_err_mentions(b.read("str_vec"), &["\"str_vec\"", "crc32c mismatch"]);

    // A slice of the partitioned variable.
    let p = b.entry("partitioned").unwrap().clone();
    let key = encode_slice_key("partitioned", &p.slices[1]);
    let table = Table::open(&index_of(&prefix)).unwrap();
    let e = BundleEntryProto::decode(table.get(&key).unwrap()).unwrap();
    let shard = shard_of(&prefix, e.shard_id as usize, 2);
    let mut data = fs::read(&shard).unwrap();
    data[e.offset as usize] ^= 0x01;
    fs::write(&shard, &data).unwrap();
    assert_err_mentions(
        b.read("partitioned"),
        &[
            "best_validation.data-00000-of-00002",
            "partitioned[3:6, 0:3]",
            "crc32c mismatch",
        ],
    );
}

#[test]
fn missing_or_short_data_shard() {
    let prefix = scratch_copy("shard_missing", "dtypes");
    let shard1 = shard_of(&prefix, 1, 2);
    fs::remove_file(&shard1).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.data-00001-of-00002", "data shard 1 of 2"],
    );

    // Shorter than the index says: caught at open, naming the tensor whose bytes are gone.
    let prefix = scratch_copy("shard_short", "dtypes");
    let shard1 = shard_of(&prefix, 1, 2);
    let data = fs::read(&shard1).unwrap();
    let b = Bundle::open(&prefix).unwrap();
    let last = b
        .keys()
        .filter(|k| b.entry(k).unwrap().slices.is_empty() && b.entry(k).unwrap().shard == 1)
        .max_by_key(|k| b.entry(k).unwrap().offset)
        .unwrap()
        .to_string();
    fs::write(&shard1, &data[..data.len() - 1]).unwrap();
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            &format!("{last:?}"),
            "past the end of",
            "data-00001-of-00002",
        ],
    );
    // ... and at read time, if the shard shrinks after opening.
    assert_err_mentions(
        b.read(&last),
        &[
            "best_validation.data-00001-of-00002",
            &format!("{last:?}"),
            "past the end of the file",
        ],
    );
}

#[test]
fn entry_metadata_errors() {
    let prefix = scratch_copy("entry_metadata", "dtypes");
    let index = index_of(&prefix);
    let good = fs::read(&index).unwrap();
    let reset = || fs::write(&index, &good).unwrap();

    // Unknown / unsupported dtype: the bundle opens, reading that tensor says why.
    edit_entry(&prefix, "i8_vec", |e| e.dtype = 99);
    let b = Bundle::open(&prefix).unwrap();
    assert!(!b.contains("i8_vec"));
    assert_eq!(
        b.unsupported().collect::<Vec<_>>(),
        [("i8_vec", "unknown dtype code 99")]
    );
    assert_err_mentions(
        b.read("i8_vec"),
        &[
            "best_validation.index",
            "\"i8_vec\"",
            "unknown dtype code 99",
        ],
    );
    b.read("u8_vec").unwrap();
    reset();
    edit_entry(&prefix, "i8_vec", |e| e.dtype = 8); // DT_COMPLEX64
    let b = Bundle::open(&prefix).unwrap();
    assert_err_mentions(
        b.read("i8_vec"),
        &["\"i8_vec\"", "DT_COMPLEX64 is not supported"],
    );
    reset();

    // Element count overflow.
    edit_entry(&prefix, "f32_3d", |e| {
        for d in &mut e.shape.as_mut().unwrap().dim {
            d.size = 1 << 40;
        }
    });
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "\"f32_3d\"", "overflows"],
    );
    reset();

    // Size not matching dtype x elements.
    edit_entry(&prefix, "f32_3d", |e| e.size = 95);
    assert_err_mentions(
        Bundle::open(&prefix),
        &[
            "best_validation.index",
            "\"f32_3d\"",
            "stored size 95 does not match 24 elements of float32",
        ],
    );
    reset();

    // Negative dimension, shard out of range, negative offset, too few string bytes.
    edit_entry(&prefix, "f32_3d", |e| {
        e.shape.as_mut().unwrap().dim[0].size = -1
    });
    assert_err_mentions(
        Bundle::open(&prefix),
        &["\"f32_3d\"", "dimension -1 is invalid"],
    );
    reset();
    edit_entry(&prefix, "f32_3d", |e| e.shard_id = 2);
    assert_err_mentions(
        Bundle::open(&prefix),
        &["\"f32_3d\"", "shard 2 is out of range"],
    );
    reset();
    edit_entry(&prefix, "f32_3d", |e| e.offset = -8);
    assert_err_mentions(Bundle::open(&prefix), &["\"f32_3d\"", "negative offset"]);
    reset();
    edit_entry(&prefix, "str_vec", |e| e.size = 5);
    assert_err_mentions(
        Bundle::open(&prefix),
        &["\"str_vec\"", "too small for 4 strings"],
    );
    reset();

    // Header problems.
    rewrite_index(&prefix, |h, _| h.num_shards = 0);
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "0 shards"],
    );
    reset();
    rewrite_index(&prefix, |h, _| h.version.as_mut().unwrap().min_consumer = 7);
    assert_err_mentions(
        Bundle::open(&prefix),
        &["best_validation.index", "reader version 7 or newer"],
    );
    reset();
    rewrite_index(&prefix, |h, _| h.endianness = 5);
    assert_err_mentions(Bundle::open(&prefix), &["unknown endianness 5"]);
    reset();
    Bundle::open(&prefix).unwrap();
}

#[test]
fn partitioned_variable_errors() {
    let prefix = scratch_copy("partitioned_errors", "dtypes");
    let index = index_of(&prefix);
    let good = fs::read(&index).unwrap();
    let b = Bundle::open(&prefix).unwrap();
    let slices = b.entry("partitioned").unwrap().slices.clone();
    let key1 = encode_slice_key("partitioned", &slices[1]);

    // A slice entry missing from the index.
    rewrite_index(&prefix, |_, entries| {
        entries.remove(&key1).unwrap();
    });
    let b = Bundle::open(&prefix).unwrap();
    assert_err_mentions(
        b.read("partitioned"),
        &[
            "best_validation.index",
            "\"partitioned\"",
            "slice partitioned[3:6, 0:3] has no entry",
        ],
    );
    fs::write(&index, &good).unwrap();

    // Slices that do not cover the tensor, and slices that overlap.
    edit_entry(&prefix, "partitioned", |e| {
        e.slices.truncate(1);
    });
    let b = Bundle::open(&prefix).unwrap();
    assert_err_mentions(
        b.read("partitioned"),
        &["\"partitioned\"", "cover 9 of 18 elements"],
    );
    fs::write(&index, &good).unwrap();
    edit_entry(&prefix, "partitioned", |e| {
        let first = e.slices[0].clone();
        e.slices.push(first);
    });
    let b = Bundle::open(&prefix).unwrap();
    assert_err_mentions(b.read("partitioned"), &["\"partitioned\"", "overlap"]);
    fs::write(&index, &good).unwrap();

    // A slice extent outside the tensor.
    edit_entry(&prefix, "partitioned", |e| e.slices[1].extent[0].start = 4);
    assert_err_mentions(
        Bundle::open(&prefix),
        &["\"partitioned\"", "does not fit dimension 6"],
    );
    fs::write(&index, &good).unwrap();

    // A slice stored with the wrong shape.
    rewrite_index(&prefix, |_, entries| {
        let e = entries.get_mut(&key1).unwrap();
        e.shape.as_mut().unwrap().dim[0].size = 1;
        e.size = 12;
    });
    let b = Bundle::open(&prefix).unwrap();
    assert_err_mentions(
        b.read("partitioned"),
        &[
            "\"partitioned\"",
            "is stored as float32 [1, 3], expected float32 [3, 3]",
        ],
    );
}

#[test]
fn big_endian_bundles_are_byte_swapped() {
    let prefix = scratch_copy("big_endian", "dtypes");
    let little = Bundle::open(&fixtures().join("dtypes/best_validation")).unwrap();
    rewrite_index(&prefix, |h, _| h.endianness = 1);
    let big = Bundle::open(&prefix).unwrap();
    assert!(big.is_big_endian());
    for key in ["f32_3d", "i64_2d", "f16_vec", "u16_vec", "partitioned"] {
        let l = little.read(key).unwrap();
        let b = big.read(key).unwrap();
        let size = l.dtype().size().unwrap();
        let swapped: Vec<u8> = l
            .bytes()
            .chunks(size)
            .flat_map(|c| c.iter().rev().copied())
            .collect();
        assert_eq!(b.bytes(), swapped.as_slice(), "{key}");
    }
    // Bytes are single-byte values: unchanged.
    assert_eq!(big.read("u8_vec").unwrap(), little.read("u8_vec").unwrap());
    // String lengths were checksummed little-endian, so a big-endian read must fail.
    assert_err_mentions(
        big.read("str_vec"),
        &["\"str_vec\"", "length checksum mismatch"],
    );
}

#[test]
fn unknown_keys_are_reported_with_the_index_file() {
    let b = Bundle::open(&fixtures().join("dtypes/best_validation")).unwrap();
    assert_err_mentions(
        b.read("no/such/var"),
        &[
            "best_validation.index",
            "\"no/such/var\" is not in the checkpoint",
        ],
    );
    assert!(b.entry("no/such/var").is_none());
    // Slice keys are not tensor names.
    assert!(b.keys().all(|k| !k.starts_with('\0')));
}

// ------------------------------------------------------------------------------------
// synthetic bundles for cases the fixtures lack

fn string_bytes(strings: &[&[u8]]) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut crc = 0;
    for s in strings {
        put_varint(&mut out, s.len() as u64);
        crc = crc32c::extend(crc, &(s.len() as u32).to_le_bytes());
    }
    let sum = crc32c::mask(crc).to_le_bytes();
    out.extend_from_slice(&sum);
    crc = crc32c::extend(crc, &sum);
    for s in strings {
        out.extend_from_slice(s);
        crc = crc32c::extend(crc, s);
    }
    (out, crc)
}

fn shape_proto(dims: &[i64]) -> Option<qpipe::formats::tf::proto::TensorShapeProto> {
    Some(qpipe::formats::tf::proto::TensorShapeProto {
        dim: dims
            .iter()
            .map(|&size| qpipe::formats::tf::proto::tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    })
}

fn slice_proto(ext: &[(i64, Option<i64>)]) -> qpipe::formats::tf::proto::TensorSliceProto {
    use qpipe::formats::tf::proto::tensor_slice_proto::{extent::HasLength, Extent as E};
    qpipe::formats::tf::proto::TensorSliceProto {
        extent: ext
            .iter()
            .map(|&(start, len)| E {
                start,
                has_length: len.map(HasLength::Length),
            })
            .collect(),
    }
}

#[test]
fn partitioned_along_inner_dimensions_and_strings() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-tests/synthetic_parts");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("model.ckpt-100");
    let mut data = vec![0u8; 3]; // entries need not start at 0 or be packed
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = vec![];
    let mut add = |key: Vec<u8>, dtype: i32, dims: &[i64], bytes: &[u8], crc: u32| {
        let offset = data.len() as i64;
        data.extend_from_slice(bytes);
        data.extend_from_slice(&[0; 5]); // alignment padding
        let e = BundleEntryProto {
            dtype,
            shape: shape_proto(dims),
            shard_id: 0,
            offset,
            size: bytes.len() as i64,
            crc32c: crc32c::mask(crc),
            slices: vec![],
        };
        entries.push((key, e.encode_to_vec()));
    };

    // emb: 4x5 float32, value r*10+c, split into columns [0:2] (stored with a
    // whole-dimension extent for rows) and [2:5] split again by rows.
    let full: Vec<f32> = (0..4)
        .flat_map(|r| (0..5).map(move |c| (r * 10 + c) as f32))
        .collect();
    let pieces: [&[(i64, Option<i64>)]; 3] = [
        &[(0, None), (0, Some(2))],
        &[(0, Some(1)), (2, Some(3))],
        &[(1, Some(3)), (2, Some(3))],
    ];
    let mut emb_slices = vec![];
    for ext in pieces {
        let rows = ext[0].0..ext[0].0 + ext[0].1.unwrap_or(4);
        let cols = ext[1].0..ext[1].0 + ext[1].1.unwrap();
        let mut bytes = vec![];
        for r in rows.clone() {
            for c in cols.clone() {
                bytes.extend_from_slice(&full[(r * 5 + c) as usize].to_le_bytes());
            }
        }
        let slice = Slice {
            extents: ext
                .iter()
                .map(|&(start, length)| Extent { start, length })
                .collect(),
        };
        let crc = crc32c::value(&bytes);
        add(
            encode_slice_key("emb", &slice),
            1,
            &[rows.end - rows.start, cols.end - cols.start],
            &bytes,
            crc,
        );
        emb_slices.push(slice_proto(ext));
    }

    // words: 3 strings, partitioned [0:1] and [1:3].
    let words: [&[u8]; 3] = [b"alpha", b"", b"\xffgamma\x00"];
    let mut word_slices = vec![];
    for (a, b) in [(0usize, 1usize), (1, 3)] {
        let (bytes, crc) = string_bytes(&words[a..b]);
        let slice = Slice {
            extents: vec![Extent {
                start: a as i64,
                length: Some((b - a) as i64),
            }],
        };
        add(
            encode_slice_key("words", &slice),
            7,
            &[(b - a) as i64],
            &bytes,
            crc,
        );
        word_slices.push(slice_proto(&[(a as i64, Some((b - a) as i64))]));
    }
    // A plain tensor whose name needs no escaping but sorts after the slice keys.
    let plain: Vec<u8> = [1.5f64, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let crc = crc32c::value(&plain);
    add(b"zeta".to_vec(), 2, &[2], &plain, crc);

    for (name, dtype, dims, slices) in [
        ("emb", 1, vec![4i64, 5], emb_slices),
        ("words", 7, vec![3], word_slices),
    ] {
        let e = BundleEntryProto {
            dtype,
            shape: shape_proto(&dims),
            slices,
            ..Default::default()
        };
        entries.push((name.as_bytes().to_vec(), e.encode_to_vec()));
    }
    let header = BundleHeaderProto {
        num_shards: 1,
        ..Default::default()
    };
    entries.push((vec![], header.encode_to_vec()));
    entries.sort();
    fs::write(shard_of(&prefix, 0, 1), &data).unwrap();
    fs::write(index_of(&prefix), build_table(&entries)).unwrap();

    let b = Bundle::open(&prefix).unwrap();
    assert_eq!(b.keys().collect::<Vec<_>>(), ["emb", "words", "zeta"]);
    let emb = b.read("emb").unwrap();
    assert_eq!(emb.shape(), [4, 5]);
    assert_eq!(emb.values::<f32>().unwrap(), full);
    let w = b.read("words").unwrap();
    assert_eq!(
        w.strings().unwrap(),
        words
            .iter()
            .map(|s| s.to_vec())
            .collect::<Vec<_>>()
            .as_slice()
    );
    assert_eq!(
        b.read("zeta").unwrap().values::<f64>().unwrap(),
        [1.5, -2.0]
    );
    // The whole-dimension extent was stored under a key with length -1 (0x7f).
    let key = encode_slice_key("emb", &b.entry("emb").unwrap().slices[0]);
    assert_eq!(&key[key.len() - 4..], [0x80, 0x7f, 0x80, 0x82]);
}

/// Every tensor of a bundle, or the first error.
fn read_all(b: &Bundle) -> qpipe::Result<BTreeMap<String, Tensor>> {
    b.keys().map(|k| Ok((k.to_string(), b.read(k)?))).collect()
}

#[test]
fn every_bit_flip_is_detected_or_harmless() {
    let prefix = scratch_copy("bit_flips", "dtypes");
    let want = read_all(&Bundle::open(&prefix).unwrap()).unwrap();
    let mut files = vec![index_of(&prefix)];
    files.extend((0..2).map(|s| shard_of(&prefix, s, 2)));
    let mut detected = 0;
    let mut harmless = 0;
    for path in &files {
        let good = fs::read(path).unwrap();
        // One bit per byte, a different one each time, keeps this fast.
        for byte in 0..good.len() {
            let bit = (byte * 5) % 8;
            let mut bad = good.clone();
            bad[byte] ^= 1 << bit;
            fs::write(path, &bad).unwrap();
            match Bundle::open(&prefix).and_then(|b| read_all(&b)) {
                Err(_) => detected += 1,
                Ok(got) => {
                    assert_eq!(
                        got,
                        want,
                        "{}: flipping bit {bit} of byte {byte} silently changed the result",
                        path.display()
                    );
                    harmless += 1;
                }
            }
        }
        fs::write(path, &good).unwrap();
        // Every truncation, too.
        for len in 0..good.len() {
            fs::write(path, &good[..len]).unwrap();
            let r = Bundle::open(&prefix).and_then(|b| read_all(&b));
            assert!(
                r.is_err(),
                "{} cut to {len} bytes was accepted",
                path.display()
            );
        }
        fs::write(path, &good).unwrap();
    }
    // The fixture's shards are densely packed, so the only bytes nobody checks are the
    // footer's zero padding (40 bytes minus at least 4 bytes of block handles).
    println!("{detected} flips detected, {harmless} harmless");
    assert!(harmless <= 36, "{detected} detected, {harmless} harmless");
}

/// The dtypes fixture's index with `edit` applied to its decoded entries, in memory.
fn edited_index(edit: impl FnOnce(&mut BTreeMap<Vec<u8>, BundleEntryProto>)) -> Vec<u8> {
    let prefix = fixtures().join("dtypes/best_validation");
    let table = Table::open(&index_of(&prefix)).unwrap();
    let mut entries: BTreeMap<Vec<u8>, BundleEntryProto> = table.entries[1..]
        .iter()
        .map(|(k, v)| (k.clone(), BundleEntryProto::decode(v.as_slice()).unwrap()))
        .collect();
    edit(&mut entries);
    let mut all = vec![table.entries[0].clone()];
    all.extend(entries.into_iter().map(|(k, e)| (k, e.encode_to_vec())));
    build_table(&all)
}

fn dtypes_shards() -> Vec<Vec<u8>> {
    let prefix = fixtures().join("dtypes/best_validation");
    (0..2)
        .map(|s| fs::read(shard_of(&prefix, s, 2)).unwrap())
        .collect()
}

#[test]
fn in_memory_bundles_read_what_the_files_hold() {
    let prefix = fixtures().join("dtypes/best_validation");
    let index = fs::read(index_of(&prefix)).unwrap();
    let from_files = read_all(&Bundle::open(&prefix).unwrap()).unwrap();
    let b = Bundle::from_bytes(&prefix, &index, dtypes_shards()).unwrap();
    assert_eq!(read_all(&b).unwrap(), from_files);
    assert_err_mentions(
        Bundle::from_bytes(&prefix, &index, vec![Vec::new()]),
        &["best_validation.index", "2 shards, 1 were given"],
    );
    assert_err_mentions(
        Bundle::from_bytes(&prefix, &index[..index.len() - 1], dtypes_shards()),
        &["best_validation.index"],
    );
}

/// Sizes, shapes and offsets in an entry are checked against the shard before a read
/// allocates anything: none of these cases may allocate the size it claims.
#[test]
fn entry_sizes_and_offsets_are_bounded_by_the_shard() {
    let prefix = fixtures().join("dtypes/best_validation");
    let open = |edit: &dyn Fn(&mut BundleEntryProto)| {
        let index = edited_index(|e| edit(e.get_mut(b"f32_3d".as_slice()).unwrap()));
        Bundle::from_bytes(&prefix, &index, dtypes_shards())
    };
    let dims = |d: &[i64]| shape_proto(d);
    // Element count overflowing usize / u64.
    assert_err_mentions(
        open(&|e| e.shape = dims(&[1 << 40, 1 << 40])),
        &["\"f32_3d\"", "overflows"],
    );
    // Element count fits, byte count overflows u64.
    assert_err_mentions(
        open(&|e| {
            e.shape = dims(&[1 << 62, 2]);
            e.size = i64::MAX;
        }),
        &["\"f32_3d\"", "overflowing"],
    );
    // A huge shape whose size matches but lies past the end of the shard.
    assert_err_mentions(
        open(&|e| {
            e.shape = dims(&[1 << 40]);
            e.size = 4 << 40;
        }),
        &["\"f32_3d\"", "past the end of", "best_validation.data-0000"],
    );
    // Offset beyond the shard, and offset + size overflowing.
    assert_err_mentions(
        open(&|e| e.offset = 1 << 20),
        &["\"f32_3d\"", "past the end of"],
    );
    assert_err_mentions(
        open(&|e| e.offset = i64::MAX),
        &["\"f32_3d\"", "past the end of"],
    );
    // A string tensor claiming more elements than its bytes can hold.
    let index = edited_index(|e| {
        e.get_mut(b"str_vec".as_slice()).unwrap().shape = dims(&[1 << 50]);
    });
    assert_err_mentions(
        Bundle::from_bytes(&prefix, &index, dtypes_shards()),
        &["\"str_vec\"", "too small for"],
    );
    // The unedited index still opens: the failures above are the edits.
    let index = edited_index(|_| {});
    Bundle::from_bytes(&prefix, &index, dtypes_shards()).unwrap();
}

/// Reading checks every pair of slices for overlap, so their number is bounded at open.
#[test]
fn a_variable_with_too_many_slices_is_refused_at_open() {
    let prefix = fixtures().join("dtypes/best_validation");
    let index = edited_index(|e| {
        let p = e.get_mut(b"partitioned".as_slice()).unwrap();
        let first = p.slices[0].clone();
        p.slices = vec![first; 20_000];
    });
    assert_err_mentions(
        Bundle::from_bytes(&prefix, &index, dtypes_shards()),
        &["\"partitioned\"", "20000 slices (at most 16384"],
    );
}
