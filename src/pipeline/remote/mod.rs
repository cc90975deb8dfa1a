//! A shared cache over HTTP, in the layout of Bazel's HTTP cache, and fanning a
//! recipe's variants out over machines.
//!
//! # Layout
//!
//! ```text
//! <url>/ac/<key>        a stage entry: checked JSON (see below), under the local blake3 key
//! <url>/cas/<sha256>    a blob (artifact or output file), under the SHA-256 of its bytes
//! ```
//!
//! An `/ac` document is the local [`ActionEntry`] (manifest, artifact and output blobs by
//! blake3 and size, metrics) plus the SHA-256 of each blob it names, written as the
//! store's checked JSON (a blake3 header over the body). The artifact's blake3 is what
//! downstream keys hash, so a remote hit gives the keys of the stages below it without
//! building or downloading anything else. Every download is checked: the document's
//! checksum, that its manifest hashes to the key it is filed under, and each blob's
//! size, SHA-256 and blake3 while it streams to a temporary file in the local store;
//! anything wrong is a warning and a miss. Uploads go blobs first (`HEAD` to skip what
//! the server has, then a streamed `PUT`), the `/ac` document last, so an entry never
//! names a blob that is not there yet.
//!
//! bazel-remote checks that a `/cas` name is the SHA-256 of the body (it is), and that
//! an `/ac` body is a REAPI `ActionResult` unless started with
//! `--disable_http_ac_validation`, which qpipe's documents need. nginx with WebDAV
//! (`dav_methods PUT; create_full_put_path on;`) serves the layout as plain files.
//!
//! # Where the URL comes from, and credentials
//!
//! `--remote-cache URL`, else `QPIPE_REMOTE_CACHE`, else `remote_cache` in `[pipeline]`.
//! Credentials (`QPIPE_REMOTE_HEADER="Name: value"`, or `user:password@` in the URL)
//! are sent only to a URL from the command line or the environment: a recipe is
//! reviewed less carefully than CI secrets, and a pull request could point it at its
//! own server. A recipe URL with credentials is an error; redirects are not followed.
//! Credentials are never printed: messages name the URL without them.
//!
//! # A bad server never fails a build
//!
//! Each request has timeouts (`QPIPE_REMOTE_TIMEOUT` seconds, default 30, idle per
//! read and write rather than total, so a large blob on a slow link still arrives) and
//! up to three attempts with backoff. When a server stays unreachable, slow or failing,
//! qpipe warns once and goes on with the local cache alone for the rest of the run.

mod client;
pub mod plan;
mod sync;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::fsutil;
use super::store::{ActionEntry, BlobRef};
use crate::error::{Error, Result};
pub use client::{Client, Fault};
pub use plan::{plan, select_stages, Plan};
pub use sync::{pull, PullReport};

/// Where the remote's URL came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Recipe,
}

/// The remote cache a command uses.
#[derive(Clone)]
pub struct Settings {
    /// Without credentials: safe to print.
    pub url: String,
    pub origin: Origin,
    /// The header sent with every request (basic credentials or `QPIPE_REMOTE_HEADER`).
    auth: Option<(String, String)>,
    pub upload: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.url)
            .field("origin", &self.origin)
            .field("auth", &self.auth.as_ref().map(|(k, _)| k))
            .field("upload", &self.upload)
            .finish()
    }
}

/// A recipe's `remote_cache` value is an http(s) URL without credentials.
pub fn check_recipe_url(url: &str) -> std::result::Result<(), String> {
    let (_, creds) = split_url(url)?;
    if creds.is_some() {
        return Err("credentials are not read from a recipe (a pull request could send them \
             elsewhere); put the URL in QPIPE_REMOTE_CACHE or --remote-cache, or use QPIPE_REMOTE_HEADER"
            .into());
    }
    Ok(())
}

/// `http[s]://[user[:password]@]host[:port][/path]` → (URL without credentials, credentials).
fn split_url(url: &str) -> std::result::Result<(String, Option<String>), String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("the remote cache URL must start with http:// or https://".into());
    };
    if !matches!(scheme, "http" | "https") {
        return Err(format!(
            "the remote cache URL must be http:// or https://, not {scheme}://"
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(p) => rest.split_at(p),
        None => (rest, ""),
    };
    let (creds, host) = match authority.rsplit_once('@') {
        Some((c, h)) => (Some(c.to_string()), h),
        None => (None, authority),
    };
    if host.is_empty() {
        return Err("the remote cache URL has no host".into());
    }
    if path.contains(['?', '#']) {
        return Err("the remote cache URL may not have a query or fragment".into());
    }
    Ok((
        format!("{scheme}://{host}{}", path.trim_end_matches('/')),
        creds,
    ))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Settings {
    /// The remote for a command: `flag` (`--remote-cache`), else `QPIPE_REMOTE_CACHE`,
    /// else the recipe's. `no_upload` is `--no-remote-upload` (`QPIPE_REMOTE_UPLOAD=0`
    /// also makes it read-only). `note` receives what the user should know (a header
    /// that is not sent).
    pub fn resolve(
        flag: Option<&str>,
        recipe_url: Option<&str>,
        no_upload: bool,
        note: &dyn Fn(&str),
    ) -> Result<Option<Settings>> {
        let env = std::env::var("QPIPE_REMOTE_CACHE")
            .ok()
            .filter(|v| !v.trim().is_empty());
        let (raw, origin) = match (flag, env, recipe_url) {
            (Some(f), _, _) => (f.to_string(), Origin::Flag),
            (None, Some(e), _) => (e, Origin::Env),
            (None, None, Some(r)) => (r.to_string(), Origin::Recipe),
            (None, None, None) => return Ok(None),
        };
        let what = match origin {
            Origin::Flag => "--remote-cache",
            Origin::Env => "QPIPE_REMOTE_CACHE",
            Origin::Recipe => "the recipe's remote_cache",
        };
        let (url, creds) = split_url(&raw).map_err(|e| Error::usage(format!("{what}: {e}")))?;
        let header = std::env::var("QPIPE_REMOTE_HEADER")
            .ok()
            .filter(|v| !v.trim().is_empty());
        let mut auth = None;
        if origin == Origin::Recipe {
            if creds.is_some() {
                return Err(Error::usage(format!(
                    "{what}: {}",
                    check_recipe_url(&raw).err().unwrap_or_default()
                )));
            }
            if header.is_some() {
                note(&format!(
                    "QPIPE_REMOTE_HEADER is not sent to {url}: it comes from the recipe \
                     (set the URL with --remote-cache or QPIPE_REMOTE_CACHE to use credentials)"
                ));
            }
        } else if let Some(h) = header {
            let Some((name, value)) = h.split_once(':') else {
                return Err(Error::usage(
                    "QPIPE_REMOTE_HEADER must look like \"Name: value\" (no ':' found)",
                ));
            };
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(Error::usage(
                    "QPIPE_REMOTE_HEADER: the header name must be letters, digits and '-'",
                ));
            }
            auth = Some((name.to_string(), value.trim().to_string()));
        } else if let Some(c) = creds {
            let (user, pass) = c.split_once(':').unwrap_or((&c, ""));
            let pair = format!("{}:{}", percent_decode(user), percent_decode(pass));
            auth = Some((
                "Authorization".to_string(),
                format!("Basic {}", base64(pair.as_bytes())),
            ));
        }
        let env_upload = std::env::var("QPIPE_REMOTE_UPLOAD")
            .map(|v| !matches!(v.trim(), "0" | "false" | "no" | "off"))
            .unwrap_or(true);
        Ok(Some(Settings {
            url,
            origin,
            auth,
            upload: !no_upload && env_upload,
        }))
    }
}

/// The remote cache of a run: the HTTP client and what goes over it.
pub struct Remote {
    pub settings: Settings,
    pub client: Client,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.fmt(f)
    }
}

/// Version of the `/ac` document.
const DOC_FORMAT: u32 = 1;

/// What `/ac/<key>` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteDoc {
    pub qpipe_remote: u32,
    pub entry: ActionEntry,
    /// blake3 → SHA-256 of every blob the entry names.
    pub sha256: BTreeMap<String, String>,
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl RemoteDoc {
    pub fn blobs(&self) -> Vec<&BlobRef> {
        let mut v: Vec<&BlobRef> = std::iter::once(&self.entry.artifact.blob)
            .chain(self.entry.outputs.iter().map(|o| &o.blob))
            .collect();
        v.sort_by(|a, b| a.blake3.cmp(&b.blake3));
        v.dedup_by(|a, b| a.blake3 == b.blake3);
        v
    }

    /// Parses and checks a document fetched for `key`.
    pub fn decode(key: &str, bytes: &[u8]) -> std::result::Result<RemoteDoc, String> {
        let doc: RemoteDoc = fsutil::from_checked_json(bytes)?;
        if doc.qpipe_remote != DOC_FORMAT {
            return Err(format!("unknown document format {}", doc.qpipe_remote));
        }
        if doc.entry.key != key || doc.entry.manifest.key() != key {
            return Err("its manifest does not hash to the key it is filed under".into());
        }
        for b in doc.blobs() {
            match doc.sha256.get(&b.blake3) {
                Some(s) if is_hex64(s) && is_hex64(&b.blake3) => {}
                _ => {
                    return Err(format!(
                        "no SHA-256 for blob {}",
                        super::store::short(&b.blake3)
                    ))
                }
            }
        }
        Ok(doc)
    }
}

impl Remote {
    pub fn new(settings: Settings) -> Remote {
        let client = Client::new(&settings);
        Remote { settings, client }
    }

    /// Turns the remote off after a server failure; the warning text the first time.
    pub fn fault(&self, why: &str) -> Option<String> {
        self.client.turn_off().then(|| {
            format!(
                "remote cache {}: {why}; continuing with the local cache only",
                self.settings.url
            )
        })
    }

    /// What `run --json` reports under `"remote"`.
    pub fn summary(&self) -> serde_json::Value {
        let s = &self.client.stats;
        serde_json::json!({
            "url": self.settings.url,
            "upload": self.settings.upload,
            "available": self.client.is_on(),
            "hits": s.hits.load(Ordering::Relaxed),
            "misses": s.misses.load(Ordering::Relaxed),
            "uploads": s.uploads.load(Ordering::Relaxed),
            "bytes_downloaded": s.bytes_down.load(Ordering::Relaxed),
            "bytes_uploaded": s.bytes_up.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_keep_their_path() {
        assert_eq!(
            split_url("http://u:p%40ss@127.0.0.1:8080/cache/").unwrap(),
            (
                "http://127.0.0.1:8080/cache".to_string(),
                Some("u:p%40ss".to_string())
            )
        );
        assert_eq!(
            split_url("https://h").unwrap(),
            ("https://h".to_string(), None)
        );
        assert!(split_url("ftp://h").is_err());
        assert!(split_url("h:80").is_err());
        assert!(split_url("http://h/x?y").is_err());
        assert!(check_recipe_url("http://a:b@h").is_err());
        assert!(check_recipe_url("http://h:1/c").is_ok());
        assert_eq!(percent_decode("p%40ss%3a"), "p@ss:");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
