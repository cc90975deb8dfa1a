//! The HTTP side of the remote cache: GET, PUT and HEAD against a Bazel-style HTTP
//! cache, with timeouts, retries with backoff, and one switch that turns the remote off
//! for the rest of the process after the first failure (one warning, never an error).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::Digest;

use super::Settings;

/// Attempts per request (the first and two retries).
const ATTEMPTS: u32 = 3;
/// The wait before the first retry; each further one waits four times longer.
const BACKOFF: Duration = Duration::from_millis(200);
/// The largest `/ac` document accepted (a stage entry is a few KiB).
const AC_MAX: u64 = 16 << 20;
/// Streaming buffer for blob transfers.
const CHUNK: usize = 1 << 20;

/// Why a request gave no usable answer.
#[derive(Debug)]
pub enum Fault {
    /// The server is unreachable, slow or failing: the remote is turned off.
    Server(String),
    /// The answer arrived but is wrong (bad hash, truncated, unparsable): a miss.
    Corrupt(String),
}

/// Counters for `run --json` and the benchmark.
#[derive(Debug, Default)]
pub struct Stats {
    pub bytes_down: AtomicU64,
    pub bytes_up: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub uploads: AtomicU64,
}

pub struct Client {
    base: String,
    auth: Option<(String, String)>,
    agent: ureq::Agent,
    off: AtomicBool,
    pub stats: Stats,
}

enum Try<T> {
    Done(T),
    Retry(String),
    Fail(Fault),
}

fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

impl Client {
    pub fn new(s: &Settings) -> Client {
        let timeout = std::env::var("QPIPE_REMOTE_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|t| *t > 0.0 && *t < 86_400.0)
            .map(Duration::from_secs_f64)
            .unwrap_or(Duration::from_secs(30));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect could carry the credentials to another host.
            .max_redirects(0)
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .timeout_recv_response(Some(timeout))
            // Idle limits, not totals: a 200 MB blob may take minutes on a slow link.
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .user_agent(concat!("qpipe/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Client {
            base: s.url.trim_end_matches('/').to_string(),
            auth: s.auth.clone(),
            agent,
            off: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }

    /// Whether the remote is still in use (false after a server failure).
    pub fn is_on(&self) -> bool {
        !self.off.load(Ordering::SeqCst)
    }

    /// Turns the remote off; `true` the first time (the caller warns once).
    pub fn turn_off(&self) -> bool {
        !self.off.swap(true, Ordering::SeqCst)
    }

    fn url(&self, space: &str, hex: &str) -> String {
        format!("{}/{space}/{hex}", self.base)
    }

    fn with_auth<B>(&self, mut req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        if let Some((k, v)) = &self.auth {
            req = req.header(k.as_str(), v.as_str());
        }
        req
    }

    fn retry<T>(&self, what: &str, mut attempt: impl FnMut() -> Try<T>) -> Result<T, Fault> {
        let mut last = String::new();
        for n in 0..ATTEMPTS {
            if !self.is_on() {
                return Err(Fault::Server("the remote cache is off".into()));
            }
            if n > 0 {
                std::thread::sleep(BACKOFF * 4u32.pow(n - 1));
            }
            match attempt() {
                Try::Done(v) => return Ok(v),
                Try::Fail(f) => return Err(f),
                Try::Retry(why) => last = why,
            }
        }
        Err(Fault::Server(format!(
            "{what}: {last} ({ATTEMPTS} attempts)"
        )))
    }

    /// `GET /ac/<key>`: the document, or `None` on a miss (404).
    pub fn get_ac(&self, key: &str) -> Result<Option<Vec<u8>>, Fault> {
        let url = self.url("ac", key);
        self.retry(&format!("GET /ac/{}", short(key)), || {
            let resp = match self.with_auth(self.agent.get(&url)).call() {
                Ok(r) => r,
                Err(e) => return Try::Retry(e.to_string()),
            };
            match resp.status().as_u16() {
                200 => {}
                404 => return Try::Done(None),
                s if retryable(s) => return Try::Retry(format!("HTTP {s}")),
                s => return Try::Fail(Fault::Server(format!("GET /ac: HTTP {s}"))),
            }
            let mut body = resp.into_body();
            match body.with_config().limit(AC_MAX).read_to_vec() {
                Ok(v) => {
                    self.stats
                        .bytes_down
                        .fetch_add(v.len() as u64, Ordering::Relaxed);
                    Try::Done(Some(v))
                }
                Err(e) => Try::Retry(format!("reading the body: {e}")),
            }
        })
    }

    /// `PUT /ac/<key>`.
    pub fn put_ac(&self, key: &str, doc: &[u8]) -> Result<(), Fault> {
        let url = self.url("ac", key);
        self.retry(&format!("PUT /ac/{}", short(key)), || {
            let req = self
                .with_auth(self.agent.put(&url))
                .header("Content-Type", "application/json");
            match req.send(doc) {
                Ok(r) if r.status().is_success() => {
                    self.stats
                        .bytes_up
                        .fetch_add(doc.len() as u64, Ordering::Relaxed);
                    Try::Done(())
                }
                Ok(r) if retryable(r.status().as_u16()) => {
                    Try::Retry(format!("HTTP {}", r.status().as_u16()))
                }
                Ok(r) => Try::Fail(Fault::Server(format!(
                    "PUT /ac: HTTP {}",
                    r.status().as_u16()
                ))),
                Err(e) => Try::Retry(e.to_string()),
            }
        })
    }

    /// `HEAD /cas/<sha256>`: whether the server has the blob.
    pub fn has_blob(&self, sha256: &str) -> Result<bool, Fault> {
        let url = self.url("cas", sha256);
        self.retry(&format!("HEAD /cas/{}", short(sha256)), || {
            match self.with_auth(self.agent.head(&url)).call() {
                Ok(r) => match r.status().as_u16() {
                    200 => Try::Done(true),
                    404 => Try::Done(false),
                    s if retryable(s) => Try::Retry(format!("HTTP {s}")),
                    s => Try::Fail(Fault::Server(format!("HEAD /cas: HTTP {s}"))),
                },
                Err(e) => Try::Retry(e.to_string()),
            }
        })
    }

    /// `PUT /cas/<sha256>` streaming the file at `path` (`size` bytes).
    pub fn put_blob(&self, sha256: &str, path: &Path, size: u64) -> Result<(), Fault> {
        let url = self.url("cas", sha256);
        self.retry(&format!("PUT /cas/{}", short(sha256)), || {
            let file = match File::open(path) {
                Ok(f) => f,
                Err(e) => return Try::Fail(Fault::Corrupt(format!("{}: {e}", path.display()))),
            };
            let req = self
                .with_auth(self.agent.put(&url))
                .header("Content-Type", "application/octet-stream");
            match req.send(file) {
                Ok(r) if r.status().is_success() => {
                    self.stats.bytes_up.fetch_add(size, Ordering::Relaxed);
                    Try::Done(())
                }
                Ok(r) if retryable(r.status().as_u16()) => {
                    Try::Retry(format!("HTTP {}", r.status().as_u16()))
                }
                Ok(r) => Try::Fail(Fault::Server(format!(
                    "PUT /cas: HTTP {}",
                    r.status().as_u16()
                ))),
                Err(e) => Try::Retry(e.to_string()),
            }
        })
    }

    /// `GET /cas/<sha256>` streamed into `dest` (created), checking on the way that the
    /// bytes are exactly `size` long with this SHA-256 and blake3. A 404 or a mismatch
    /// is [`Fault::Corrupt`] (the entry that names the blob is unusable).
    pub fn get_blob(
        &self,
        sha256: &str,
        blake3: &str,
        size: u64,
        dest: &Path,
    ) -> Result<(), Fault> {
        let url = self.url("cas", sha256);
        self.retry(&format!("GET /cas/{}", short(sha256)), || {
            let resp = match self.with_auth(self.agent.get(&url)).call() {
                Ok(r) => r,
                Err(e) => return Try::Retry(e.to_string()),
            };
            match resp.status().as_u16() {
                200 => {}
                404 => {
                    return Try::Fail(Fault::Corrupt(format!(
                        "blob {} is not on the server",
                        short(sha256)
                    )))
                }
                s if retryable(s) => return Try::Retry(format!("HTTP {s}")),
                s => return Try::Fail(Fault::Server(format!("GET /cas: HTTP {s}"))),
            }
            let mut file = match File::create(dest) {
                Ok(f) => f,
                Err(e) => {
                    return Try::Fail(Fault::Server(format!(
                        "cannot create {}: {e}",
                        dest.display()
                    )))
                }
            };
            // Unlimited here; reading stops one byte past the expected size.
            let mut reader = resp.into_body().into_reader();
            let mut sha = sha2::Sha256::new();
            let mut b3 = blake3::Hasher::new();
            let mut got = 0u64;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => return Try::Retry(format!("reading blob: {e}")),
                };
                got += n as u64;
                self.stats.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                if got > size {
                    break;
                }
                sha.update(&buf[..n]);
                b3.update(&buf[..n]);
                if let Err(e) = file.write_all(&buf[..n]) {
                    return Try::Fail(Fault::Server(format!("writing {}: {e}", dest.display())));
                }
            }
            if got != size {
                return Try::Fail(Fault::Corrupt(format!(
                    "blob {} has {}{} bytes, expected {size}",
                    short(sha256),
                    got,
                    if got > size { "+" } else { "" }
                )));
            }
            let sha_hex = hex(&sha.finalize());
            if sha_hex != sha256 || b3.finalize().to_hex().as_str() != blake3 {
                return Try::Fail(Fault::Corrupt(format!(
                    "blob {} does not match its hash",
                    short(sha256)
                )));
            }
            if let Err(e) = file.sync_all() {
                return Try::Fail(Fault::Server(format!("writing {}: {e}", dest.display())));
            }
            Try::Done(())
        })
    }
}

/// The SHA-256 and blake3 of a file, streamed.
pub fn hash_file(path: &Path) -> std::io::Result<(String, String)> {
    let mut f = File::open(path)?;
    let mut sha = sha2::Sha256::new();
    let mut b3 = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        b3.update(&buf[..n]);
    }
    Ok((hex(&sha.finalize()), b3.finalize().to_hex().to_string()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}
