//! The persister's side of a run: a built stage's blobs, output files and entry written
//! behind the computation, within a memory budget, and stage memos kept in the store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::artifact_codec::encode_artifact;
use super::engine::{lock, Engine};
use super::fsutil::{self, FileLock};
use super::store::{self, ActionEntry, Miss};
use crate::error::{Error, Result};
use crate::progress::Bar;
use crate::stages::{Artifact, Memo};

/// A built stage's result on its way into the store.
pub(super) struct Persist {
    pub(super) i: usize,
    pub(super) entry: ActionEntry,
    pub(super) artifact: Arc<Artifact>,
    /// The artifact is an input's, stored by that stage's own (earlier) persist job.
    pub(super) passed_through: bool,
    pub(super) files: Vec<PendingFile>,
    /// The stage's key lock, held until its entry is published.
    pub(super) lock: Option<FileLock>,
}

impl Persist {
    /// Memory only this job keeps alive: its output files' bytes.
    pub(super) fn held_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes.len() as u64).sum()
    }
}

/// Output bytes waiting in the persister's queue. A stage whose outputs would take it
/// over the budget waits for room, so that writing behind the computation never costs
/// more memory than this (a lone job larger than the budget waits for an empty queue).
/// A waiting stage holds its worker, so a budget below two large exports idles the
/// CPU: on the 200k x 256 TextCNN (two 200 MB exports) 160 MiB gave 6.0 s and 0.72 GB
/// peak, 448 MiB 4.8-5.6 s and 0.97 GB.
pub(super) struct Backlog {
    pub(super) budget: u64,
    pub(super) bytes: Mutex<u64>,
    pub(super) room: std::sync::Condvar,
}

pub(super) const BACKLOG_BUDGET: u64 = 448 << 20;

/// [`BACKLOG_BUDGET`], or `QPIPE_WRITE_BACKLOG_MIB` mebibytes (for a machine with
/// little memory, or a slow disk).
pub(super) fn backlog_budget() -> u64 {
    std::env::var("QPIPE_WRITE_BACKLOG_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(BACKLOG_BUDGET, |m| m.saturating_mul(1 << 20))
}

impl Backlog {
    pub(super) fn acquire(&self, n: u64) {
        let mut held = lock(&self.bytes);
        while *held > 0 && *held + n > self.budget {
            held = self.room.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += n;
    }

    pub(super) fn release(&self, n: u64) {
        let mut held = lock(&self.bytes);
        *held = held.saturating_sub(n);
        self.room.notify_all();
    }
}

pub(super) struct PendingFile {
    pub(super) decl: String,
    pub(super) abs: std::path::PathBuf,
    pub(super) bytes: Vec<u8>,
    pub(super) blob: store::BlobRef,
}

impl<'r> Engine<'r> {
    /// Stores what [`Engine::build`] made durable (artifact blob, output blobs, output
    /// files), then publishes its entry and ref, in that order, and releases its key lock.
    pub(super) fn persist(&self, job: Persist) -> Result<()> {
        let i = job.i;
        // The files under out_dir are written on a second thread while the blobs are:
        // copying into the page cache is most of a large stage's storing time.
        let (blobs, outputs) = std::thread::scope(|scope| {
            let outputs = scope.spawn(|| -> Result<()> {
                for f in &job.files {
                    self.write_output(i, &f.abs, &f.bytes, &f.blob.blake3)?;
                }
                Ok(())
            });
            let blobs = self.persist_blobs(&job);
            let outputs = outputs
                .join()
                .unwrap_or_else(|_| Err(Error::msg("writing the output files panicked")));
            (blobs, outputs)
        });
        blobs?;
        outputs?;
        self.pause_point("publish", i);
        self.store
            .publish_action(&job.entry, &|| self.pause_point("action", i))?;
        self.write_ref(i, &job.entry.manifest, &job.entry.key);
        if let Some(remote) = &self.remote {
            let label = format!("stage '{}'", self.recipe.stages[i].id);
            remote.upload_entry(&self.store, &job.entry, &label, &|w| self.warn(w));
        }
        drop(job);
        self.pause_point("done", i);
        Ok(())
    }

    /// The artifact's blob (unless an input's, already stored) and the output files' blobs.
    fn persist_blobs(&self, job: &Persist) -> Result<()> {
        let i = job.i;
        let blob = &job.entry.artifact.blob;
        let produce = |sink: &mut dyn FnMut(&[u8])| encode_artifact(&job.artifact, sink);
        if !(job.passed_through && self.store.check_blob(blob, false).is_ok()) {
            if job.passed_through {
                let actual = store::blob_ref_of(&produce);
                if &actual != blob {
                    return Err(Error::msg(
                        "its input's artifact could not be stored (see that stage's error)",
                    ));
                }
            }
            let bar = self.write_bar("storing the artifact", blob.size, i);
            let shown = counted(&produce, &bar);
            self.store.put_blob_with(
                blob,
                if bar.is_shown() { &shown } else { &produce },
                &|| self.pause_point("store", i),
            )?;
        }
        for f in &job.files {
            let half = f.bytes.len() / 2;
            let produce = |sink: &mut dyn FnMut(&[u8])| {
                sink(&f.bytes[..half]);
                sink(&f.bytes[half..]);
            };
            let bar = self.write_bar(&format!("storing {}", f.decl), f.bytes.len() as u64, i);
            let shown = counted(&produce, &bar);
            self.store.put_blob_with(
                &f.blob,
                if bar.is_shown() { &shown } else { &produce },
                &|| self.pause_point("outblob", i),
            )?;
        }
        Ok(())
    }

    /// A bytes bar on stage `i`'s line for a large write (none for a small one).
    fn write_bar(&self, label: &str, size: u64, i: usize) -> Bar {
        self.observer
            .progress(&self.recipe.stages[i].id)
            .start_write(label, size)
    }

    /// Writes an output file under `out_dir` atomically, unless it already has these bytes.
    pub(super) fn write_output(
        &self,
        i: usize,
        abs: &Path,
        bytes: &[u8],
        blake3: &str,
    ) -> Result<()> {
        let dir = abs.parent().unwrap_or(Path::new("."));
        if !self.recipe.allow_outside_out_dir {
            super::outdir::confine(&self.recipe.out_dir, abs)?;
        }
        fsutil::create_dir_all(dir)?;
        let _lock = self.store.output_lock(abs)?;
        if matches!(self.hasher.hash(abs), Ok(h) if h.blake3 == blake3) {
            return Ok(());
        }
        if let Some(name) = abs.file_name().map(|n| n.to_string_lossy().into_owned()) {
            // Temporary files for this output left by a killed run (we hold its lock).
            let orphan_prefix = format!(".{name}.qpipe-tmp.");
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&orphan_prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let name = abs.file_name().unwrap_or(abs.as_os_str()).to_string_lossy();
        let bar = self.write_bar(&format!("writing {name}"), bytes.len() as u64, i);
        if !bar.is_shown() {
            return fsutil::write_atomic(dir, abs, bytes, &|| self.pause_point("output", i));
        }
        let half = bytes.len() / 2;
        let produce = |sink: &mut dyn FnMut(&[u8])| {
            sink(&bytes[..half]);
            sink(&bytes[half..]);
        };
        let shown = counted(&produce, &bar);
        fsutil::write_atomic_with(dir, abs, bytes.len() as u64, &shown, &|| {
            self.pause_point("output", i)
        })
    }
}

/// Largest piece written between two updates of a bytes bar.
const BAR_STEP: usize = 8 << 20;

/// `produce` with its pieces handed on in slices of at most [`BAR_STEP`] bytes,
/// each counted on `bar` once written.
#[allow(clippy::type_complexity)] // the shape of fsutil::Produce, which names it
fn counted<'a>(produce: fsutil::Produce<'a>, bar: &'a Bar) -> impl Fn(&mut dyn FnMut(&[u8])) + 'a {
    move |sink| {
        produce(&mut |piece: &[u8]| {
            for part in piece.chunks(BAR_STEP) {
                sink(part);
                bar.inc(part.len() as u64);
            }
        })
    }
}

/// [`Memo`] over the store, keyed under the running stage's manifest (minus config),
/// or, for shared values, under the stage's own key and qpipe's version alone.
pub(super) struct StoreMemo<'e, 'r> {
    pub(super) engine: &'e Engine<'r>,
    pub(super) stage: usize,
    pub(super) base: [u8; 32],
    /// Config key → blake3 of the upstream artifact (from the manifest).
    pub(super) inputs: BTreeMap<String, String>,
    pub(super) used: Mutex<BTreeSet<String>>,
}

impl StoreMemo<'_, '_> {
    fn memo_key(&self, prefix: &[u8], name: &str, key: &[u8]) -> String {
        let mut h = blake3::Hasher::new();
        h.update(prefix);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.finalize().to_hex().to_string()
    }

    /// The value under `mkey`, computed under its lock when absent (or corrupt), so
    /// that stages asking at once compute it once; a published value is whole or absent.
    fn lookup(
        &self,
        mkey: String,
        name: &str,
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        lock(&self.used).insert(mkey.clone());
        let store = &self.engine.store;
        let id = &self.engine.recipe.stages[self.stage].id;
        let warn_corrupt = |m: Miss| {
            if let Miss::Corrupt(why) = m {
                self.engine.warn(&format!(
                    "stage '{id}': memo '{name}' is corrupt ({why}); recomputing"
                ));
            }
        };
        match store.read_memo(&mkey) {
            Ok(v) => return Ok(v),
            Err(m) => warn_corrupt(m),
        }
        let _lock = store.memo_lock(&mkey)?;
        if let Ok(v) = store.read_memo(&mkey) {
            return Ok(v);
        }
        let value = compute()?;
        let mid_write = || self.engine.pause_point("memo", self.stage);
        if let Err(e) = store.publish_memo(&mkey, name, &value, &mid_write) {
            self.engine
                .warn(&format!("stage '{id}': cannot cache memo '{name}': {e}"));
        }
        Ok(value)
    }
}

impl Memo for StoreMemo<'_, '_> {
    fn get_or_compute(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let mut prefix = b"qpipe memo\0".to_vec();
        prefix.extend_from_slice(&self.base);
        let mkey = self.memo_key(&prefix, name, key);
        self.lookup(mkey, name, compute)
    }

    fn input_digest(&self, key: &str) -> Option<String> {
        self.inputs.get(key).cloned()
    }

    fn get_or_compute_shared(
        &self,
        name: &str,
        key: &[u8],
        compute: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let prefix = format!("qpipe shared memo\0{}\0", env!("CARGO_PKG_VERSION"));
        let mkey = self.memo_key(prefix.as_bytes(), name, key);
        self.lookup(mkey, name, compute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Progress, WRITE_BAR_MIN};
    use indicatif::{MultiProgress, ProgressDrawTarget};

    #[test]
    fn counted_hands_on_the_same_bytes_in_bar_steps_and_counts_them() {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
        let bar = Progress::new(&multi, "s").start_write("w", WRITE_BAR_MIN);
        assert!(bar.is_shown());
        let data: Vec<u8> = (0..BAR_STEP * 2 + 5).map(|i| i as u8).collect();
        let produce = |sink: &mut dyn FnMut(&[u8])| {
            sink(&data[..3]);
            sink(&data[3..]);
        };
        let mut got = Vec::new();
        let mut pieces = Vec::new();
        counted(&produce, &bar)(&mut |p: &[u8]| {
            pieces.push(p.len());
            got.extend_from_slice(p);
        });
        assert_eq!(got, data);
        assert_eq!(pieces, vec![3, BAR_STEP, BAR_STEP, 2]);
        assert_eq!(bar.position(), data.len() as u64);
    }
}
