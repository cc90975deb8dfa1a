//! A real HTTP cache for the remote-cache tests: Debian's nginx with its WebDAV module,
//! started on 127.0.0.1 on a free port in a directory under target/tmp, stopped on drop.

#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "nginx is not installed: the remote-cache tests run against Debian's nginx with \
         WebDAV (`apt-get install -y nginx`; .ci/run installs it when missing)"
    );
}

pub struct Nginx {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Nginx {
    pub fn start(name: &str) -> Nginx {
        let bin = nginx_binary();
        let dir = root().join("target/tmp/remote_cache/servers").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["root", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // A port the kernel just handed out; nginx binds it right after.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let conf = format!(
            "worker_processes 1; daemon off; master_process off;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n\
               client_body_temp_path {d}/tmp; client_max_body_size 4g;\n\
               proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
               uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
               log_format qp '$request_method $uri $status $http_authorization';\n\
               access_log {d}/access.log qp;\n\
               server {{ listen 127.0.0.1:{port}; root {d}/root;\n\
                 location / {{ dav_methods PUT; create_full_put_path on;\n\
                   dav_access user:rw group:rw all:r; }}\n\
                 location /failing/ {{ return 503; }}\n\
                 location /forbidden/ {{ return 403; }} }} }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new(&bin)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut server = Nginx {
            dir,
            port,
            child: Some(child),
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
                panic!("nginx exited ({status}): {}", server.error_log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nginx did not listen on port {port}: {}",
                server.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Files under `<root>/<space>` (`ac` or `cas`).
    pub fn files(&self, space: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.join("root").join(space))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A copy of the repository's recipes next to a link to its fixtures (one "machine").
pub fn workspace(test: &str, name: &str) -> PathBuf {
    let dir = root().join("target/tmp/remote_cache").join(test).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("recipes")).unwrap();
    std::fs::copy(
        root().join("recipes/push_student.toml"),
        dir.join("recipes/push_student.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(root().join("fixtures"), dir.join("fixtures")).unwrap();
    dir
}

pub const RECIPE: &str = "recipes/push_student.toml";

pub fn qpipe_cmd(args: &[&str], cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qpipe"));
    c.args(args)
        .current_dir(cwd)
        .env_remove("QPIPE_CACHE_DIR")
        .env_remove("QPIPE_REMOTE_CACHE")
        .env_remove("QPIPE_REMOTE_HEADER")
        .env_remove("QPIPE_REMOTE_UPLOAD")
        .env("QPIPE_REMOTE_TIMEOUT", "3");
    c
}

pub fn qpipe(args: &[&str], cwd: &Path) -> Output {
    qpipe_cmd(args, cwd).output().expect("qpipe runs")
}

pub fn ok_stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok_stdout(o)).expect("one JSON document on stdout")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (id, status, cache) of every stage of a `run --json` document.
pub fn statuses(run: &serde_json::Value) -> Vec<(String, String, Option<String>)> {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["cache"].as_str().map(String::from),
            )
        })
        .collect()
}

/// Every file under `dir`, relative, with its bytes.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut bytes = Vec::new();
                std::fs::File::open(&p)
                    .unwrap()
                    .read_to_end(&mut bytes)
                    .unwrap();
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// Asserts two output directories hold the same files with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert!(!ta.is_empty(), "{} is empty", a.display());
    let names = |t: &[(PathBuf, Vec<u8>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "{} vs {}", a.display(), b.display());
    for ((p, x), (_, y)) in ta.iter().zip(&tb) {
        assert!(x == y, "{} differs between the machines", p.display());
    }
}
