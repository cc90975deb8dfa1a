//! Content hashes of external files, with a persisted stat cache (see the "External
//! files" section of [`super::fingerprint`] for why it is safe).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::fsutil;
use crate::error::{Error, Result};

/// Files whose mtime or ctime is younger than this when hashing starts are rehashed
/// on every use (racily clean: a write in the same timestamp tick would go unseen).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub ino: u64,
    pub dev: u64,
}

impl Stat {
    pub fn of(path: &Path) -> std::io::Result<Stat> {
        let m = std::fs::metadata(path)?;
        if !m.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok(Stat::from_metadata(&m))
    }

    #[cfg(unix)]
    fn from_metadata(m: &std::fs::Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            size: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    #[cfg(not(unix))]
    fn from_metadata(m: &std::fs::Metadata) -> Stat {
        let ns = |t: std::io::Result<SystemTime>| {
            t.ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0)
        };
        Stat {
            size: m.len(),
            mtime_ns: ns(m.modified()),
            ctime_ns: ns(m.created()),
            ino: 0,
            dev: 0,
        }
    }

    /// Whether the file changed too recently (relative to `since`) for this stamp to
    /// prove the content unchanged later.
    fn is_racy(&self, since: SystemTime) -> bool {
        let since_ns = since
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let newest = self.mtime_ns.max(self.ctime_ns);
        newest + RACY_WINDOW.as_nanos() as i128 > since_ns
    }
}

/// A file's content hash and the stamp it was taken under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub blake3: String,
    pub stat: Stat,
    /// The stamp alone cannot vouch for this content later (see [`RACY_WINDOW`]).
    pub racy: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stat: Stat,
    blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    entries: HashMap<PathBuf, Entry>,
}

/// Hashes files, remembering hashes across runs when that is safe.
pub struct FileHasher {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: HashMap<PathBuf, Entry>,
    dirty: bool,
}

impl FileHasher {
    /// A hasher with no persisted state.
    pub fn ephemeral() -> FileHasher {
        FileHasher {
            path: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Loads the stat cache at `path`. A missing cache is empty; an unreadable one is
    /// empty too, with a warning (returned) — it only costs rehashing.
    pub fn load(path: PathBuf) -> (FileHasher, Option<String>) {
        let (entries, warning) = match fsutil::read_optional(&path) {
            Ok(None) => (HashMap::new(), None),
            Ok(Some(bytes)) => match fsutil::from_checked_json::<Persisted>(&bytes) {
                Ok(p) => (p.entries, None),
                Err(e) => (
                    HashMap::new(),
                    Some(format!(
                        "{}: {e}; ignoring it (files will be rehashed)",
                        path.display()
                    )),
                ),
            },
            Err(e) => (
                HashMap::new(),
                Some(format!("{}: {e}; files will be rehashed", path.display())),
            ),
        };
        let hasher = FileHasher {
            path: Some(path),
            state: Mutex::new(State {
                entries,
                dirty: false,
            }),
        };
        (hasher, warning)
    }

    /// The content hash of `path` (absolute).
    pub fn hash(&self, path: &Path) -> Result<Hashed> {
        let stat = Stat::of(path).map_err(|e| Error::io(path, e))?;
        if let Some(e) = self.lock().entries.get(path) {
            if e.stat == stat {
                return Ok(Hashed {
                    blake3: e.blake3.clone(),
                    stat,
                    racy: false,
                });
            }
        }
        let hashed = hash_stable(path)?;
        let mut state = self.lock();
        if hashed.racy {
            if state.entries.remove(path).is_some() {
                state.dirty = true;
            }
        } else {
            state.entries.insert(
                path.to_path_buf(),
                Entry {
                    stat: hashed.stat,
                    blake3: hashed.blake3.clone(),
                },
            );
            state.dirty = true;
        }
        Ok(hashed)
    }

    /// Whether `path` still has the content `before` described: same stamp, and for a
    /// racy file the same hash.
    pub fn unchanged(&self, path: &Path, before: &Hashed) -> Result<bool> {
        let stat = match Stat::of(path) {
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        if stat != before.stat {
            return Ok(false);
        }
        if before.racy {
            return Ok(hash_stable(path)?.blake3 == before.blake3);
        }
        Ok(true)
    }

    /// Writes the stat cache back if it changed (atomically; concurrent runs may
    /// overwrite each other's additions, which only costs rehashing).
    pub fn save(&self, tmp_dir: &Path) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let state = self.lock();
        if !state.dirty {
            return Ok(());
        }
        let persisted = Persisted {
            entries: state.entries.clone(),
        };
        let bytes = fsutil::to_checked_json(&persisted)?;
        fsutil::write_atomic(tmp_dir, path, &bytes, &|| {})
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hashes a file, retrying if it changes while being read.
fn hash_stable(path: &Path) -> Result<Hashed> {
    for _ in 0..3 {
        let started = SystemTime::now();
        let before = Stat::of(path).map_err(|e| Error::io(path, e))?;
        let blake3 = hash_file(path)?;
        let after = Stat::of(path).map_err(|e| Error::io(path, e))?;
        if before == after {
            return Ok(Hashed {
                blake3,
                stat: after,
                racy: after.is_racy(started),
            });
        }
    }
    Err(Error::file(path, "keeps changing while being read"))
}

/// The blake3 of a file's content, streamed.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = blake3::Hasher::new();
    // Sized to the file: a no-op run verifies dozens of small blobs, and a 4 MiB
    // buffer for each costs more than hashing them.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = vec![0u8; len.clamp(64 << 10, 4 << 20) as usize];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        if n >= 1 << 20 {
            h.update_rayon(&buf[..n]);
        } else {
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "qpipe-filehash-{name}-{}-{}",
            std::process::id(),
            fsutil::unique_tmp_name("t")
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Sets mtime to `secs_ago` in the past (ctime stays "now", so still racy unless the
    /// test also waits); used to show that ctime alone keeps a fresh write untrusted.
    fn set_mtime_past(path: &Path, secs_ago: u64) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago))
            .unwrap();
    }

    #[test]
    fn fresh_files_are_racy_and_always_rehashed() {
        let d = tmpdir("racy");
        let p = d.join("a.bin");
        std::fs::write(&p, b"hello").unwrap();
        set_mtime_past(&p, 100);
        let h = FileHasher::ephemeral();
        let first = h.hash(&p).unwrap();
        assert!(
            first.racy,
            "ctime is fresh, so the stamp must not be trusted"
        );
        // Same size, mtime forced back to the same value: only the content tells.
        std::fs::write(&p, b"jello").unwrap();
        set_mtime_past(&p, 100);
        let second = h.hash(&p).unwrap();
        assert_ne!(first.blake3, second.blake3);
        assert!(!h.unchanged(&p, &first).unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn stat_cache_round_trips_and_rejects_corruption() {
        let d = tmpdir("persist");
        let cache = d.join("stat.json");
        let (h, w) = FileHasher::load(cache.clone());
        assert!(w.is_none());
        {
            let mut st = h.lock();
            st.entries.insert(
                d.join("x"),
                Entry {
                    stat: Stat {
                        size: 1,
                        mtime_ns: 2,
                        ctime_ns: 3,
                        ino: 4,
                        dev: 5,
                    },
                    blake3: "ab".into(),
                },
            );
            st.dirty = true;
        }
        h.save(&d).unwrap();
        let (h2, w) = FileHasher::load(cache.clone());
        assert!(w.is_none());
        assert_eq!(h2.lock().entries.len(), 1);
        let mut bytes = std::fs::read(&cache).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&cache, &bytes).unwrap();
        let (h3, w) = FileHasher::load(cache);
        assert!(w.unwrap().contains("checksum"));
        assert!(h3.lock().entries.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
