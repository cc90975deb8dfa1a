//! The content-addressed store under the cache directory.
//!
//! ```text
//! <cache>/CACHEDIR.TAG, .gitignore
//! <cache>/v1/objects/<aa>/<blake3>      blobs: artifacts and output files, by content
//! <cache>/v1/actions/<aa>/<key>.json    stage key → artifact, outputs, metrics, manifest
//! <cache>/v1/memo/<aa>/<key>.json       memo key → blob
//! <cache>/v1/refs/<pipeline>/<stage>.json   the manifest each stage last used (gc roots)
//! <cache>/v1/stat-cache.json            file stamps → content hashes
//! <cache>/v1/runs/<pipeline>.json       the last run's outcome (see `super::lastrun`)
//! <cache>/v1/tmp/                       temporary files, renamed into place
//! <cache>/v1/locks/                     advisory locks (gc.lock, per key, per output)
//! ```
//!
//! Records (actions, memo, refs, the stat cache) are "checked JSON" (a blake3 header
//! over the body), written atomically. An action entry is published only after every
//! blob it names is durable, so a crash at any point leaves either no entry or a
//! complete one. Every blob read is verified against its hash; a corrupt or missing
//! blob or record is a warning and a miss, never an error or a wrong result. A run
//! holds `gc.lock` shared and takes a per-key lock before building a stage, so
//! concurrent runs wait for each other's work instead of failing or duplicating it,
//! and `cache gc`/`verify` (exclusive) never delete what a run is about to publish.
//! Entries are addressed by hash only and never name a path to write: output paths
//! come from the recipe.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fingerprint::{self, Manifest};
use super::fsutil::{self, FileLock};
use crate::error::Result;

/// The layout version; a new layout lives beside the old one and never misreads it.
pub const LAYOUT: &str = "v1";

/// Blobs up to this size are fully rehashed on every cache hit; larger ones are
/// size-checked on a hit and rehashed whenever they are read.
pub const VERIFY_ON_HIT_MAX: u64 = 64 << 20;

/// A blob as an entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    pub blake3: String,
    pub size: u64,
}

/// The artifact of a stage: a graph (IR serialization) or a report (canonical JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    pub kind: String,
    pub blob: BlobRef,
}

/// An output file of a stage, relative to `out_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRef {
    pub path: String,
    pub blob: BlobRef,
}

/// What a successful stage run left in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionEntry {
    pub key: String,
    /// The stage id that produced it (informational).
    pub stage: String,
    pub manifest: Manifest,
    pub artifact: ArtifactRef,
    pub outputs: Vec<OutputRef>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Memo keys the run used (kept alive by `gc` with the entry).
    pub memo: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoEntry {
    key: String,
    name: String,
    blob: BlobRef,
}

/// The manifest a stage of a pipeline last used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRef {
    pub pipeline: String,
    pub stage: String,
    pub key: String,
    pub manifest: Manifest,
}

/// Why a cached record or blob cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub enum Miss {
    Absent,
    Corrupt(String),
}

pub struct Store {
    root: PathBuf,
    dir: PathBuf,
}

fn shard(hex: &str) -> &str {
    hex.get(..2).unwrap_or("__")
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hash and size of the content `produce` streams.
pub fn blob_ref_of(produce: fsutil::Produce) -> BlobRef {
    let mut h = blake3::Hasher::new();
    let mut size = 0u64;
    produce(&mut |piece: &[u8]| {
        size += piece.len() as u64;
        if piece.len() >= 1 << 20 {
            h.update_rayon(piece);
        } else {
            h.update(piece);
        }
    });
    BlobRef {
        blake3: h.finalize().to_hex().to_string(),
        size,
    }
}

/// A file-name-safe, injective spelling of an id.
fn escape_name(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        let safe = c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '@' | ',' | '=' | '+');
        if safe || (c == '.' && i > 0) {
            out.push(c);
        } else {
            for b in c.to_string().bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if out.len() > 120 {
        let h = fingerprint::blake3_hex(s.as_bytes());
        out.truncate(80);
        out.push('~');
        out.push_str(&h[..32]);
    }
    out
}

impl Store {
    /// Opens (creating if needed) the store in `cache_dir`.
    pub fn open(cache_dir: &Path) -> Result<Store> {
        let store = Store::at(cache_dir);
        fsutil::refuse_dangling_symlink(&store.root)?;
        for sub in ["objects", "actions", "memo", "refs", "tmp", "locks"] {
            fsutil::create_dir_all(&store.dir.join(sub))?;
        }
        let tag = cache_dir.join("CACHEDIR.TAG");
        if !tag.exists() {
            // The tag goes through v1/tmp, which gc and verify empty: hold the run lock.
            let _lock = store.run_lock()?;
            let text = "Signature: 8a477f597d28d172789f06886806bc55\n\
                        # This directory is a qpipe cache; see https://bford.info/cachedir/\n";
            fsutil::write_atomic(&store.tmp_dir(), &tag, text.as_bytes(), &|| {})?;
            let gi = cache_dir.join(".gitignore");
            fsutil::write_atomic(&store.tmp_dir(), &gi, b"*\n", &|| {})?;
        }
        Ok(store)
    }

    /// The store in `cache_dir` without creating anything (for read-only commands).
    pub fn at(cache_dir: &Path) -> Store {
        let root = fsutil::absolute(cache_dir);
        let dir = root.join(LAYOUT);
        Store { root, dir }
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    pub fn stat_cache_path(&self) -> PathBuf {
        self.dir.join("stat-cache.json")
    }

    fn object_path(&self, hash: &str) -> PathBuf {
        self.dir.join("objects").join(shard(hash)).join(hash)
    }

    fn action_path(&self, key: &str) -> PathBuf {
        self.dir
            .join("actions")
            .join(shard(key))
            .join(format!("{key}.json"))
    }

    fn memo_path(&self, key: &str) -> PathBuf {
        self.dir
            .join("memo")
            .join(shard(key))
            .join(format!("{key}.json"))
    }

    fn ref_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.dir
            .join("refs")
            .join(escape_name(pipeline))
            .join(format!("{}.json", escape_name(stage)))
    }

    // ---- locks ----

    /// Held (shared) by every run for its whole duration; `gc` and `verify` take it exclusively.
    pub fn run_lock(&self) -> Result<FileLock> {
        FileLock::shared(&self.dir.join("locks").join("gc.lock"))
    }

    fn maintenance_lock(&self) -> Result<FileLock> {
        FileLock::exclusive(&self.dir.join("locks").join("gc.lock"))
    }

    /// Serializes building one key across threads and processes.
    pub fn key_lock(&self, key: &str) -> Result<FileLock> {
        FileLock::exclusive(
            &self
                .dir
                .join("locks")
                .join(format!("{}.lock", shard_safe(key))),
        )
    }

    /// Serializes writes to one output path across threads and processes.
    pub fn output_lock(&self, path: &Path) -> Result<FileLock> {
        let h = fingerprint::blake3_hex(path.as_os_str().as_encoded_bytes());
        FileLock::exclusive(
            &self
                .dir
                .join("locks")
                .join(format!("out-{}.lock", &h[..32])),
        )
    }

    // ---- blobs ----

    /// Stores `bytes` (idempotent; an existing blob is kept only if it verifies).
    pub fn put_blob(&self, bytes: &[u8], mid_write: &dyn Fn()) -> Result<BlobRef> {
        let blob = BlobRef {
            blake3: fingerprint::blake3_hex(bytes),
            size: bytes.len() as u64,
        };
        let half = bytes.len() / 2;
        self.put_blob_with(
            &blob,
            &|sink| {
                sink(&bytes[..half]);
                sink(&bytes[half..]);
            },
            mid_write,
        )?;
        Ok(blob)
    }

    /// Stores the content `produce` streams, whose hash and size the caller computed
    /// with [`blob_ref_of`] from the same producer (idempotent, like [`Store::put_blob`]).
    pub fn put_blob_with(
        &self,
        blob: &BlobRef,
        produce: fsutil::Produce,
        mid_write: &dyn Fn(),
    ) -> Result<()> {
        if self.check_blob(blob, true).is_ok() {
            return Ok(());
        }
        if !is_hex64(&blob.blake3) {
            return Err(crate::error::Error::msg(format!(
                "bad blob hash '{}'",
                blob.blake3
            )));
        }
        let path = self.object_path(&blob.blake3);
        if let Some(parent) = path.parent() {
            fsutil::create_dir_all(parent)?;
        }
        fsutil::write_atomic_with(&self.tmp_dir(), &path, blob.size, produce, mid_write)
    }

    /// Where a blob lives (for streaming it elsewhere; read it only after [`Store::check_blob`]).
    pub fn blob_path(&self, blob: &BlobRef) -> Option<PathBuf> {
        is_hex64(&blob.blake3).then(|| self.object_path(&blob.blake3))
    }

    /// Moves `file` (in [`Store::tmp_dir`], written and synced, whose content the caller
    /// verified to be `blob`) into place: the remote cache's downloads.
    pub fn adopt_blob(&self, blob: &BlobRef, file: &Path) -> Result<()> {
        if self.check_blob(blob, false).is_ok() {
            let _ = fs::remove_file(file);
            return Ok(());
        }
        let path = self
            .blob_path(blob)
            .ok_or_else(|| crate::error::Error::msg(format!("bad blob hash '{}'", blob.blake3)))?;
        let parent = path.parent().unwrap_or(&self.dir);
        fsutil::create_dir_all(parent)?;
        fs::rename(file, &path).map_err(|e| crate::error::Error::io(&path, e))?;
        let _ = fsutil::sync_dir(parent);
        Ok(())
    }

    /// Checks that a blob exists with its size, and (if `verify`) its hash.
    pub fn check_blob(&self, blob: &BlobRef, verify: bool) -> std::result::Result<(), Miss> {
        if !is_hex64(&blob.blake3) {
            return Err(Miss::Corrupt(format!("bad blob hash '{}'", blob.blake3)));
        }
        let path = self.object_path(&blob.blake3);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Corrupt(format!("{}: {e}", path.display()))),
        };
        if meta.len() != blob.size {
            return Err(Miss::Corrupt(format!(
                "blob {} has {} bytes, expected {}",
                short(&blob.blake3),
                meta.len(),
                blob.size
            )));
        }
        if verify {
            let actual =
                super::filehash::hash_file(&path).map_err(|e| Miss::Corrupt(e.to_string()))?;
            if actual != blob.blake3 {
                return Err(Miss::Corrupt(format!(
                    "blob {} does not match its hash",
                    short(&blob.blake3)
                )));
            }
        }
        Ok(())
    }

    /// Reads and verifies a blob.
    pub fn read_blob(&self, blob: &BlobRef) -> std::result::Result<Vec<u8>, Miss> {
        if !is_hex64(&blob.blake3) {
            return Err(Miss::Corrupt(format!("bad blob hash '{}'", blob.blake3)));
        }
        let path = self.object_path(&blob.blake3);
        let bytes = match fsutil::read_optional(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Corrupt(format!("{}: {e}", path.display()))),
        };
        if bytes.len() as u64 != blob.size || fingerprint::blake3_hex(&bytes) != blob.blake3 {
            return Err(Miss::Corrupt(format!(
                "blob {} does not match its hash",
                short(&blob.blake3)
            )));
        }
        Ok(bytes)
    }

    // ---- action entries ----

    /// The entry for `key`, checked: record checksum, its key, the key recomputed from
    /// its manifest. Blobs are checked by the caller (it knows which it needs).
    pub fn read_action(&self, key: &str) -> std::result::Result<ActionEntry, Miss> {
        let path = self.action_path(key);
        let bytes = match fsutil::read_optional(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Corrupt(format!("{}: {e}", path.display()))),
        };
        let entry: ActionEntry = fsutil::from_checked_json(&bytes).map_err(Miss::Corrupt)?;
        if entry.key != key {
            return Err(Miss::Corrupt(format!(
                "entry is filed under {} but says {}",
                short(key),
                short(&entry.key)
            )));
        }
        if entry.manifest.key() != key {
            return Err(Miss::Corrupt(
                "entry's manifest does not hash to its key".into(),
            ));
        }
        Ok(entry)
    }

    /// Publishes an entry. The caller must have stored every blob it names.
    /// `mid_write` runs when half of the record is written (a test hook).
    pub fn publish_action(&self, entry: &ActionEntry, mid_write: &dyn Fn()) -> Result<()> {
        let path = self.action_path(&entry.key);
        if let Some(parent) = path.parent() {
            fsutil::create_dir_all(parent)?;
        }
        let bytes = fsutil::to_checked_json(entry)?;
        fsutil::write_atomic(&self.tmp_dir(), &path, &bytes, mid_write)
    }

    // ---- memo ----

    pub fn read_memo(&self, key: &str) -> std::result::Result<Vec<u8>, Miss> {
        let path = self.memo_path(key);
        let bytes = match fsutil::read_optional(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Corrupt(format!("{}: {e}", path.display()))),
        };
        let entry: MemoEntry = fsutil::from_checked_json(&bytes).map_err(Miss::Corrupt)?;
        if entry.key != key {
            return Err(Miss::Corrupt("memo entry filed under another key".into()));
        }
        self.read_blob(&entry.blob)
    }

    /// `mid_write` runs when half of the value's blob is written (a test hook).
    pub fn publish_memo(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
        mid_write: &dyn Fn(),
    ) -> Result<()> {
        let blob = self.put_blob(value, mid_write)?;
        let entry = MemoEntry {
            key: key.to_string(),
            name: name.to_string(),
            blob,
        };
        let path = self.memo_path(key);
        if let Some(parent) = path.parent() {
            fsutil::create_dir_all(parent)?;
        }
        let bytes = fsutil::to_checked_json(&entry)?;
        fsutil::write_atomic(&self.tmp_dir(), &path, &bytes, &|| {})
    }

    pub fn memo_lock(&self, key: &str) -> Result<FileLock> {
        FileLock::exclusive(
            &self
                .dir
                .join("locks")
                .join(format!("memo-{}.lock", shard_safe(key))),
        )
    }

    // ---- refs ----

    pub fn read_ref(&self, pipeline: &str, stage: &str) -> std::result::Result<StageRef, Miss> {
        let path = self.ref_path(pipeline, stage);
        let bytes = match fsutil::read_optional(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(Miss::Absent),
            Err(e) => return Err(Miss::Corrupt(format!("{}: {e}", path.display()))),
        };
        let r: StageRef = fsutil::from_checked_json(&bytes).map_err(Miss::Corrupt)?;
        if r.pipeline != pipeline || r.stage != stage || r.manifest.key() != r.key {
            return Err(Miss::Corrupt("ref does not match its place".into()));
        }
        Ok(r)
    }

    /// `mid_write` runs when half of the record is written (a test hook).
    pub fn write_ref(&self, r: &StageRef, mid_write: &dyn Fn()) -> Result<()> {
        let path = self.ref_path(&r.pipeline, &r.stage);
        if let Some(parent) = path.parent() {
            fsutil::create_dir_all(parent)?;
        }
        let bytes = fsutil::to_checked_json(r)?;
        fsutil::write_atomic(&self.tmp_dir(), &path, &bytes, mid_write)
    }

    // ---- maintenance ----

    fn list_records(&self, sub: &str) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let base = self.dir.join(sub);
        for e in walkdir::WalkDir::new(&base)
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .flatten()
        {
            if !e.file_type().is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy();
            let key = name.strip_suffix(".json").unwrap_or(&name).to_string();
            out.push((key, e.path().to_path_buf()));
        }
        out.sort();
        out
    }

    fn list_objects(&self) -> Vec<(String, PathBuf, u64)> {
        let mut out = Vec::new();
        let base = self.dir.join("objects");
        for e in walkdir::WalkDir::new(&base)
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .flatten()
        {
            if e.file_type().is_file() {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((
                    e.file_name().to_string_lossy().into_owned(),
                    e.path().to_path_buf(),
                    size,
                ));
            }
        }
        out.sort();
        out
    }

    fn list_refs(&self) -> Vec<(PathBuf, std::result::Result<StageRef, String>)> {
        let mut out = Vec::new();
        let base = self.dir.join("refs");
        for e in walkdir::WalkDir::new(&base)
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .flatten()
        {
            if !e.file_type().is_file() {
                continue;
            }
            let parsed = fs::read(e.path())
                .map_err(|err| err.to_string())
                .and_then(|b| fsutil::from_checked_json::<StageRef>(&b));
            out.push((e.path().to_path_buf(), parsed));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// What `qpipe cache ls` shows.
    pub fn listing(&self) -> Listing {
        let objects = self.list_objects();
        let sizes: BTreeMap<String, u64> =
            objects.iter().map(|(h, _, s)| (h.clone(), *s)).collect();
        let mut stages = Vec::new();
        let mut referenced = BTreeSet::new();
        for (path, r) in self.list_refs() {
            let Ok(r) = r else {
                stages.push(ListedStage {
                    pipeline: "?".into(),
                    stage: path.display().to_string(),
                    kind: "?".into(),
                    key: String::new(),
                    present: false,
                    bytes: 0,
                });
                continue;
            };
            let entry = self.read_action(&r.key).ok();
            let mut bytes = 0;
            if let Some(e) = &entry {
                referenced.insert(e.key.clone());
                for b in std::iter::once(&e.artifact.blob).chain(e.outputs.iter().map(|o| &o.blob))
                {
                    bytes += sizes.get(&b.blake3).copied().unwrap_or(0);
                }
            }
            stages.push(ListedStage {
                pipeline: r.pipeline,
                stage: r.stage,
                kind: r.manifest.kind,
                key: r.key,
                present: entry.is_some(),
                bytes,
            });
        }
        let actions = self.list_records("actions");
        Listing {
            root: self.root.clone(),
            stages,
            objects: objects.len(),
            object_bytes: objects.iter().map(|o| o.2).sum(),
            actions: actions.len(),
            unreferenced_actions: actions
                .iter()
                .filter(|(k, _)| !referenced.contains(k))
                .count(),
            memo: self.list_records("memo").len(),
        }
    }

    /// Removes what no ref reaches: action entries other than the refs' keys, memo
    /// entries those entries do not use, unreachable blobs, temporary files and stale
    /// lock files. With `current = Some((pipeline, stage ids))`, refs of that pipeline's
    /// stages that are not in the list are dropped first (stages removed from the
    /// recipe). Waits for running `qpipe run`s to finish first.
    pub fn gc(&self, current: Option<(&str, &BTreeSet<String>)>) -> Result<GcReport> {
        let _lock = self.maintenance_lock()?;
        let mut report = GcReport::default();
        let mut live_actions = BTreeSet::new();
        let mut live_memo = BTreeSet::new();
        let mut live_blobs = BTreeSet::new();
        for (path, r) in self.list_refs() {
            match r {
                Ok(r)
                    if current
                        .is_some_and(|(p, ids)| p == r.pipeline && !ids.contains(&r.stage)) =>
                {
                    remove(&path, &mut report.removed_files, &mut report.removed_bytes);
                    report.dropped_refs += 1;
                }
                Ok(r) => {
                    if let Ok(e) = self.read_action(&r.key) {
                        live_actions.insert(e.key.clone());
                        live_blobs.insert(e.artifact.blob.blake3.clone());
                        live_blobs.extend(e.outputs.iter().map(|o| o.blob.blake3.clone()));
                        live_memo.extend(e.memo.iter().cloned());
                    }
                }
                Err(_) => {
                    remove(&path, &mut report.removed_files, &mut report.removed_bytes);
                }
            }
        }
        for (key, path) in self.list_records("memo") {
            let keep = live_memo.contains(&key)
                && fs::read(&path)
                    .ok()
                    .and_then(|b| fsutil::from_checked_json::<MemoEntry>(&b).ok())
                    .map(|m| live_blobs.insert(m.blob.blake3))
                    .is_some();
            if !keep {
                remove(&path, &mut report.removed_files, &mut report.removed_bytes);
            }
        }
        for (key, path) in self.list_records("actions") {
            if !live_actions.contains(&key) {
                remove(&path, &mut report.removed_files, &mut report.removed_bytes);
                report.removed_actions += 1;
            }
        }
        for (hash, path, _) in self.list_objects() {
            if !live_blobs.contains(&hash) {
                remove(&path, &mut report.removed_files, &mut report.removed_bytes);
                report.removed_objects += 1;
            }
        }
        self.clear_dir(&self.tmp_dir(), &mut report);
        for e in fs::read_dir(self.dir.join("locks"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name() != "gc.lock" {
                let _ = fs::remove_file(e.path());
            }
        }
        for sub in ["objects", "actions", "memo", "refs"] {
            remove_empty_shards(&self.dir.join(sub));
        }
        report.kept_actions = live_actions.len();
        Ok(report)
    }

    fn clear_dir(&self, dir: &Path, report: &mut GcReport) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            remove(
                &e.path(),
                &mut report.removed_files,
                &mut report.removed_bytes,
            );
        }
    }

    /// Rehashes every blob and rechecks every record; removes what is corrupt (and the
    /// entries that name a missing or corrupt blob). Waits for running runs first.
    pub fn verify(&self) -> Result<VerifyReport> {
        let _lock = self.maintenance_lock()?;
        let mut report = VerifyReport::default();
        let mut good_blobs = BTreeSet::new();
        for (hash, path, _) in self.list_objects() {
            report.objects += 1;
            let ok = is_hex64(&hash)
                && super::filehash::hash_file(&path)
                    .map(|h| h == hash)
                    .unwrap_or(false);
            if ok {
                good_blobs.insert(hash);
            } else {
                report
                    .corrupt
                    .push(format!("object {hash}: content does not match its name"));
                let _ = fs::remove_file(&path);
            }
        }
        let blob_ok = |b: &BlobRef| {
            good_blobs.contains(&b.blake3)
                && fs::metadata(self.object_path(&b.blake3))
                    .map(|m| m.len() == b.size)
                    .unwrap_or(false)
        };
        for (key, path) in self.list_records("actions") {
            report.actions += 1;
            let problem = match self.read_action(&key) {
                Err(Miss::Corrupt(e)) => Some(e),
                Err(Miss::Absent) => Some("unreadable".into()),
                Ok(e) => std::iter::once(&e.artifact.blob)
                    .chain(e.outputs.iter().map(|o| &o.blob))
                    .find(|b| !blob_ok(b))
                    .map(|b| format!("names missing or corrupt blob {}", short(&b.blake3))),
            };
            if let Some(p) = problem {
                report.corrupt.push(format!("action {key}: {p}"));
                let _ = fs::remove_file(&path);
            }
        }
        for (key, path) in self.list_records("memo") {
            report.memo += 1;
            let problem = match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| fsutil::from_checked_json::<MemoEntry>(&b))
            {
                Err(e) => Some(e),
                Ok(m) if m.key != key => Some("filed under another key".into()),
                Ok(m) if !blob_ok(&m.blob) => Some(format!(
                    "names missing or corrupt blob {}",
                    short(&m.blob.blake3)
                )),
                Ok(_) => None,
            };
            if let Some(p) = problem {
                report.corrupt.push(format!("memo {key}: {p}"));
                let _ = fs::remove_file(&path);
            }
        }
        for (path, r) in self.list_refs() {
            report.refs += 1;
            if let Err(e) = r {
                report.corrupt.push(format!("ref {}: {e}", path.display()));
                let _ = fs::remove_file(&path);
            }
        }
        let stat_cache = self.stat_cache_path();
        if let Ok(Some(bytes)) = fsutil::read_optional(&stat_cache) {
            if let Err(e) = fsutil::from_checked_json::<serde_json::Value>(&bytes) {
                report.corrupt.push(format!("stat cache: {e}"));
                let _ = fs::remove_file(&stat_cache);
            }
        }
        Ok(report)
    }
}

fn shard_safe(key: &str) -> String {
    if is_hex64(key) {
        key.to_string()
    } else {
        fingerprint::blake3_hex(key.as_bytes())
    }
}

fn remove(path: &Path, files: &mut usize, bytes: &mut u64) {
    let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    if removed.is_ok() {
        *files += 1;
        *bytes += size;
    }
}

fn remove_empty_shards(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        // Fails (and is meant to) unless the shard is empty.
        let _ = fs::remove_dir(e.path());
    }
}

/// The first 12 hex digits of a hash, for messages.
pub fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[derive(Debug, Clone)]
pub struct ListedStage {
    pub pipeline: String,
    pub stage: String,
    pub kind: String,
    pub key: String,
    /// Whether the entry the ref names is still in the cache.
    pub present: bool,
    /// Bytes of the blobs the entry names.
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Listing {
    pub root: PathBuf,
    pub stages: Vec<ListedStage>,
    pub objects: usize,
    pub object_bytes: u64,
    pub actions: usize,
    pub unreferenced_actions: usize,
    pub memo: usize,
}

#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub kept_actions: usize,
    /// Refs of stages no longer in the recipe given to `gc`.
    pub dropped_refs: usize,
    pub removed_actions: usize,
    pub removed_objects: usize,
    pub removed_files: usize,
    pub removed_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub objects: usize,
    pub actions: usize,
    pub memo: usize,
    pub refs: usize,
    /// One line per corrupt item found (each was removed).
    pub corrupt: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_name_is_safe_and_injective_on_examples() {
        let names = ["int8@DEFAULT", "a/b", "a%2Fb", "..", ".x", "é", "a b"];
        let escaped: BTreeSet<String> = names.iter().map(|n| escape_name(n)).collect();
        assert_eq!(escaped.len(), names.len());
        for e in &escaped {
            assert!(!e.contains('/') && !e.starts_with('.'), "{e}");
        }
        assert_eq!(escape_name("int8@DEFAULT"), "int8@DEFAULT");
        assert!(escape_name(&"x".repeat(300)).len() <= 121);
    }
}
