//! Crash-safe file writes, advisory locks and checked JSON files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other thread or process will pick for a temporary file.
pub fn unique_tmp_name(stem: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{stem}.qpipe-tmp.{}.{}.{nanos}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `bytes` to `dest` atomically: a temporary file in `tmp_dir` (same
/// filesystem as `dest`), fsync, rename over `dest`, fsync of `dest`'s directory.
/// A reader sees the old file or the new one, never a torn one; a crash leaves at
/// most an orphaned temporary file. `mid_write` runs after half the bytes are
/// written (a test hook for crashes during a write).
pub fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8], mid_write: &dyn Fn()) -> Result<()> {
    let half = bytes.len() / 2;
    write_atomic_with(
        tmp_dir,
        dest,
        bytes.len() as u64,
        &|sink| {
            sink(&bytes[..half]);
            sink(&bytes[half..]);
        },
        mid_write,
    )
}

/// Pieces of a file's content, handed one after another to a sink.
pub type Produce<'a> = &'a dyn Fn(&mut dyn FnMut(&[u8]));

/// [`write_atomic`] for content that `produce` streams in pieces, so a large file is
/// never held in memory whole. It must stream exactly `size` bytes; `mid_write` runs
/// once at least half of them are written.
pub fn write_atomic_with(
    tmp_dir: &Path,
    dest: &Path,
    size: u64,
    produce: Produce,
    mid_write: &dyn Fn(),
) -> Result<()> {
    let stem = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = tmp_dir.join(unique_tmp_name(&format!(".{stem}")));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut written = 0u64;
        let mut failed: Option<io::Error> = None;
        let mut paused = false;
        produce(&mut |piece: &[u8]| {
            if failed.is_some() {
                return;
            }
            if written + piece.len() as u64 > size {
                failed = Some(io::Error::other(format!(
                    "content is longer than the {size} bytes announced"
                )));
                return;
            }
            if !paused && written * 2 >= size && !piece.is_empty() {
                paused = true;
                mid_write();
            }
            match f.write_all(piece) {
                Ok(()) => written += piece.len() as u64,
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if written != size {
            return Err(io::Error::other(format!(
                "content has {written} bytes, {size} were announced"
            )));
        }
        if !paused {
            mid_write();
        }
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dest)?;
        sync_dir(
            dest.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(dest, e));
    }
    Ok(())
}

/// Makes a rename or creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir) {
        Ok(d) => d.sync_all().or_else(|e| {
            // Some filesystems refuse fsync on directories; the rename is still atomic.
            if e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error() == Some(22) {
                Ok(())
            } else {
                Err(e)
            }
        }),
        Err(e) => Err(e),
    }
}

/// `s` cut to its start and end when it is too long to echo in a message (a recipe
/// may hold a 10 MB path): what is left still identifies it, and the length is given.
pub fn shorten(s: &str) -> String {
    const HEAD: usize = 160;
    const TAIL: usize = 80;
    let n = s.chars().count();
    if n <= HEAD + TAIL + 20 {
        return s.to_string();
    }
    let head: String = s.chars().take(HEAD).collect();
    let tail: String = s.chars().skip(n - TAIL).collect();
    format!("{head}…{tail} ({n} characters)")
}

/// An error naming `path` if it is a symlink to nothing (creating a directory there
/// would fail with a bare "File exists").
pub fn refuse_dangling_symlink(path: &Path) -> Result<()> {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && fs::metadata(path).is_err() {
        let target = fs::read_link(path)
            .map(|t| format!(" (it points to {}, which does not exist)", t.display()))
            .unwrap_or_default();
        return Err(Error::msg(format!(
            "{} is a dangling symlink{target}; create its target or remove the link",
            path.display()
        )));
    }
    Ok(())
}

pub fn create_dir_all(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// An advisory lock held until dropped (flock on Unix: released by the kernel when
/// the process dies, so a killed run never leaves a lock behind).
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Waits for an exclusive lock on `path` (created if missing).
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        let file = open_lock_file(path)?;
        file.lock().map_err(|e| Error::io(path, e))?;
        Ok(FileLock { _file: file })
    }

    /// Waits for a shared lock on `path` (created if missing).
    pub fn shared(path: &Path) -> Result<FileLock> {
        let file = open_lock_file(path)?;
        file.lock_shared().map_err(|e| Error::io(path, e))?;
        Ok(FileLock { _file: file })
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

const CHECKED_MAGIC: &str = "qpipe-json v1 blake3=";

/// Serializes `value` as a "checked JSON" file: a header line with the blake3 of the
/// JSON bytes that follow. Any truncation or bit flip is detected before parsing.
pub fn to_checked_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::msg(format!("cannot serialize cache record: {e}")))?;
    let mut out = format!("{CHECKED_MAGIC}{}\n", blake3::hash(&json).to_hex()).into_bytes();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parses a checked JSON file; the error says what is wrong with it.
pub fn from_checked_json<T: DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
    let want = header
        .strip_prefix(CHECKED_MAGIC)
        .ok_or("unknown header (not a qpipe v1 record)")?;
    let body = &bytes[nl + 1..];
    if blake3::hash(body).to_hex().as_str() != want {
        return Err("checksum mismatch (truncated or modified)".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("bad record: {e}"))
}

/// Reads a file, distinguishing "absent" (Ok(None)) from other failures.
pub fn read_optional(path: &Path) -> std::result::Result<Option<Vec<u8>>, io::Error> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `path` made absolute against the current directory, without touching the filesystem.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_writes_land_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(unique_tmp_name("qpipe-fsutil"));
        fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.bin");
        let halfway = std::cell::Cell::new(None);
        let pieces = |sink: &mut dyn FnMut(&[u8])| {
            sink(b"abc");
            sink(&[7u8; 100_000]);
            sink(b"");
            sink(b"xyz");
        };
        let probe = || halfway.set(Some(fs::read_dir(&dir).unwrap().count()));
        write_atomic_with(&dir, &dest, 100_006, &pieces, &probe).unwrap();
        let got = fs::read(&dest).unwrap();
        assert_eq!(got.len(), 100_006);
        assert_eq!((&got[..3], &got[100_003..]), (&b"abc"[..], &b"xyz"[..]));
        // Halfway through, the content was in a temporary file beside `dest`, not in it.
        assert_eq!(halfway.get(), Some(1));

        for (size, why) in [(100_005, "longer"), (100_007, "100006 bytes")] {
            let e = write_atomic_with(&dir, &dest, size, &pieces, &|| {})
                .unwrap_err()
                .to_string();
            assert!(e.contains("out.bin") && e.contains(why), "{e}");
            assert_eq!(
                fs::read(&dest).unwrap(),
                got,
                "a failed write keeps the old file"
            );
        }
        let names: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
