//! The remote cache against a real server (nginx with WebDAV, started by each test):
//! machines sharing results, corrupt entries, a dying or stalled server, concurrent
//! uploads, credentials, and shards fanned in by `compare`.

mod remote_util;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use remote_util::*;

fn all(run: &serde_json::Value, status: &str, cache: Option<&str>) -> bool {
    statuses(run)
        .iter()
        .all(|(_, s, c)| s == status && c.as_deref() == cache)
}

#[test]
fn two_machines_share_results_and_the_second_builds_nothing() {
    let server = Nginx::start("share");
    let url = server.url();
    let a = workspace("share", "a");
    let first = json(&qpipe(
        &["run", RECIPE, "--json", "--remote-cache", &url],
        &a,
    ));
    assert!(all(&first, "ran", None), "{first}");
    let n = statuses(&first).len() as u64;
    assert_eq!(first["remote"]["uploads"], n, "{first}");
    assert_eq!(first["remote"]["url"], url.as_str());
    assert_eq!(server.files("ac").len() as u64, n);
    assert!(!server.files("cas").is_empty());

    // A second machine, the URL from the environment this time.
    let b = workspace("share", "b");
    let out = qpipe_cmd(&["run", RECIPE, "--json"], &b)
        .env("QPIPE_REMOTE_CACHE", &url)
        .output()
        .unwrap();
    let second = json(&out);
    assert!(all(&second, "cached", Some("remote")), "{second}");
    assert_eq!(second["remote"]["uploads"], 0);
    assert_eq!(second["remote"]["hits"], n);
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    assert_same_tree(&a.join("recipes/out"), &b.join("recipes/out"));
    let keys = |r: &serde_json::Value| -> Vec<String> {
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(&first), keys(&second));

    // Then it is the local cache that serves it.
    let third = json(&qpipe(
        &["run", RECIPE, "--json", "--remote-cache", &url],
        &b,
    ));
    assert!(all(&third, "cached", Some("local")), "{third}");
    assert_eq!(third["remote"]["bytes_downloaded"], 0);

    // A plan on a third machine knows every key from the remote alone and downloads nothing.
    let c = workspace("share", "c");
    let plan = json(&qpipe(
        &["plan", RECIPE, "--json", "--remote-cache", &url],
        &c,
    ));
    let stages = plan["stages"].as_array().unwrap();
    assert_eq!(stages.len() as u64, n);
    for (s, k) in stages.iter().zip(keys(&first)) {
        assert_eq!(s["key"], k.as_str(), "{s}");
        assert_eq!(s["cached"], "remote", "{s}");
    }
    assert!(!c.join("recipes/.qpipe").exists(), "plan wrote a cache");
    let check = stages.iter().find(|s| s["id"] == "check_fp16").unwrap();
    assert_eq!(check["deps"], serde_json::json!(["strip", "fp16"]));
    let variants = plan["variants"].as_array().unwrap();
    let v = variants
        .iter()
        .find(|v| v["id"] == "int8@DEFAULT")
        .expect("an int8@DEFAULT variant");
    assert_eq!(
        v["stages"],
        serde_json::json!(["check_int8@DEFAULT", "tflite_int8@DEFAULT"])
    );
    assert_eq!(plan["shards"].as_array().unwrap().len(), variants.len());

    // Without the remote only the first stage's key is known.
    let bare = json(&qpipe(&["plan", RECIPE, "--json"], &c));
    let known: Vec<&str> = bare["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["key"].is_null())
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(known, ["freeze"]);
}

#[test]
fn a_corrupt_entry_on_the_server_is_rebuilt_never_used_and_then_replaced() {
    let server = Nginx::start("corrupt");
    let url = server.url();
    let a = workspace("corrupt", "a");
    let first = json(&qpipe(
        &["run", RECIPE, "--json", "--remote-cache", &url],
        &a,
    ));
    assert!(all(&first, "ran", None), "{first}");
    // Every blob keeps its size with one byte changed; one /ac document too.
    for f in server.files("cas") {
        let mut bytes = std::fs::read(&f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(&f, bytes).unwrap();
    }
    let ac = server.files("ac");
    let mut doc = std::fs::read(&ac[0]).unwrap();
    let last = doc.len() - 2;
    doc[last] ^= 0x01;
    std::fs::write(&ac[0], doc).unwrap();

    let b = workspace("corrupt", "b");
    let out = qpipe(&["run", RECIPE, "--json", "--remote-cache", &url], &b);
    let second = json(&out);
    let err = stderr(&out);
    assert!(all(&second, "ran", None), "{second}\n{err}");
    assert!(err.contains("does not match its hash"), "{err}");
    let unusable = err
        .lines()
        .filter(|l| l.contains("remote cache entry") && l.contains("treating it as a miss"))
        .count();
    assert_eq!(unusable as u64, statuses(&second).len() as u64, "{err}");
    assert!(
        !err.contains("continuing with the local cache only"),
        "a corrupt entry is a miss, not a server failure: {err}"
    );
    assert_same_tree(&a.join("recipes/out"), &b.join("recipes/out"));

    // The rebuilding machine replaced what was corrupt.
    let c = workspace("corrupt", "c");
    let out = qpipe(&["run", RECIPE, "--json", "--remote-cache", &url], &c);
    let third = json(&out);
    assert!(
        all(&third, "cached", Some("remote")),
        "{third}\n{}",
        stderr(&out)
    );
    assert_same_tree(&a.join("recipes/out"), &c.join("recipes/out"));
}

fn remote_warnings(err: &str) -> usize {
    err.lines()
        .filter(|l| l.contains("continuing with the local cache only"))
        .count()
}

#[test]
fn a_server_killed_mid_run_dead_failing_or_stalled_never_fails_the_build() {
    let reference = workspace("dead", "reference");
    let full = json(&qpipe(&["run", RECIPE, "--json"], &reference));
    assert!(all(&full, "ran", None));

    // Killed as soon as the first stage is done (its upload is under way or next).
    let mut server = Nginx::start("dead");
    let url = server.url();
    let a = workspace("dead", "a");
    let mut child = qpipe_cmd(&["run", RECIPE, "--json", "-v", "--remote-cache", &url], &a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let mut err = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while lines.read_line(&mut line).unwrap() > 0 {
        if line.starts_with("done") && server_running(&server) {
            server.stop();
        }
        err.push_str(&line);
        line.clear();
    }
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(status.success(), "{err}");
    assert!(
        !server_running(&server),
        "the server was never killed: {err}"
    );
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["ok"], true, "{run}");
    assert_eq!(run["remote"]["available"], false, "{run}");
    assert_eq!(remote_warnings(&err), 1, "{err}");
    assert_same_tree(&reference.join("recipes/out"), &a.join("recipes/out"));

    // A server that answers 503 (retried, then given up) or 403 (given up at once).
    let failing = Nginx::start("failing");
    for (path, status) in [("failing", 503), ("forbidden", 403)] {
        let ws = workspace("dead", path);
        let o = qpipe(
            &[
                "run",
                RECIPE,
                "--json",
                "--remote-cache",
                &format!("{}/{path}", failing.url()),
            ],
            &ws,
        );
        assert_eq!(json(&o)["ok"], true);
        let err = stderr(&o);
        assert_eq!(remote_warnings(&err), 1, "{err}");
        assert!(err.contains(&format!("HTTP {status}")), "{err}");
        assert_same_tree(&reference.join("recipes/out"), &ws.join("recipes/out"));
    }
    let requests = |code: &str| {
        failing
            .access_log()
            .lines()
            .filter(|l| l.contains(&format!(" {code} ")))
            .count()
    };
    assert_eq!(requests("503"), 3, "three attempts, then off");
    assert_eq!(requests("403"), 1, "no retry of a refusal");
    drop(failing);

    // Nothing listens there now: one warning, a local build.
    let b = workspace("dead", "b");
    let t0 = Instant::now();
    let o = qpipe(&["run", RECIPE, "--json", "--remote-cache", &url], &b);
    assert!(json(&o)["ok"] == true);
    assert_eq!(remote_warnings(&stderr(&o)), 1, "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(120));

    // A server that accepts connections and never answers: the timeout, then one warning.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stalled.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        stalled.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match stalled.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let c = workspace("dead", "c");
    let t0 = Instant::now();
    let o = qpipe_cmd(
        &[
            "run",
            RECIPE,
            "--json",
            "--remote-cache",
            &format!("http://127.0.0.1:{port}"),
        ],
        &c,
    )
    .env("QPIPE_REMOTE_TIMEOUT", "1")
    .output()
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    acceptor.join().unwrap();
    assert!(json(&o)["ok"] == true);
    let err = stderr(&o);
    assert_eq!(remote_warnings(&err), 1, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(120));
    assert_same_tree(&reference.join("recipes/out"), &c.join("recipes/out"));
}

fn server_running(s: &Nginx) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", s.port)).is_ok()
}

#[test]
fn concurrent_uploads_of_the_same_keys_are_safe() {
    let server = Nginx::start("concurrent");
    let url = server.url();

    // nginx writes a PUT body to a temporary file and renames it into place: readers
    // see the old or the new content, whole, never a mixture or a partial file.
    let path = format!("{url}/cas/atomicity-probe");
    let size = 4 << 20;
    let bodies: Vec<Vec<u8>> = vec![vec![0x11; size], vec![0x22; size]];
    std::thread::scope(|s| {
        for w in 0..4 {
            let (path, body) = (&path, &bodies[w % 2]);
            s.spawn(move || {
                for _ in 0..8 {
                    let r = ureq::put(path).send(&body[..]).expect("PUT");
                    assert!(r.status().is_success(), "{}", r.status());
                }
            });
        }
        for _ in 0..2 {
            let (path, bodies) = (&path, &bodies);
            s.spawn(move || {
                for _ in 0..30 {
                    match ureq::get(path).call() {
                        Ok(mut r) => {
                            let got = r
                                .body_mut()
                                .with_config()
                                .limit(64 << 20)
                                .read_to_vec()
                                .unwrap();
                            assert!(
                                bodies.contains(&got),
                                "a reader saw {} bytes of a mixed or partial body",
                                got.len()
                            );
                        }
                        Err(ureq::Error::StatusCode(404)) => {}
                        Err(e) => panic!("GET: {e}"),
                    }
                }
            });
        }
    });

    // Two machines build and upload the same recipe at the same time.
    let machines: Vec<_> = ["a1", "a2"]
        .iter()
        .map(|m| workspace("concurrent", m))
        .collect();
    let children: Vec<_> = machines
        .iter()
        .map(|ws| {
            qpipe_cmd(&["run", RECIPE, "--json", "--remote-cache", &url], ws)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_eq!(json(&o)["ok"], true);
        assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    }
    let b = workspace("concurrent", "b");
    let o = qpipe(&["run", RECIPE, "--json", "--remote-cache", &url], &b);
    let run = json(&o);
    assert!(all(&run, "cached", Some("remote")), "{run}\n{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert_same_tree(&machines[0].join("recipes/out"), &b.join("recipes/out"));
    assert_same_tree(&machines[1].join("recipes/out"), &b.join("recipes/out"));
}

#[test]
fn read_only_mode_and_credentials_go_only_where_they_should() {
    let server = Nginx::start("auth");
    let url = server.url();
    let token = "Bearer s3cret-t0ken";

    // Read-only: nothing is written to the server.
    let a = workspace("auth", "a");
    let o = qpipe_cmd(&["run", RECIPE, "--json", "--remote-cache", &url], &a)
        .env("QPIPE_REMOTE_UPLOAD", "0")
        .output()
        .unwrap();
    let run = json(&o);
    assert!(all(&run, "ran", None));
    assert_eq!(run["remote"]["upload"], false);
    assert!(server.files("ac").is_empty() && server.files("cas").is_empty());
    let o = qpipe(
        &[
            "run",
            RECIPE,
            "--json",
            "--remote-cache",
            &url,
            "--no-remote-upload",
            "--only",
            "freeze",
        ],
        &workspace("auth", "a2"),
    );
    assert_eq!(json(&o)["remote"]["uploads"], 0);
    assert!(
        !server.access_log().contains("PUT"),
        "{}",
        server.access_log()
    );

    // A header from the environment goes to a URL from the environment.
    let b = workspace("auth", "b");
    let o = qpipe_cmd(&["run", RECIPE, "--json", "--only", "freeze"], &b)
        .env("QPIPE_REMOTE_CACHE", &url)
        .env("QPIPE_REMOTE_HEADER", format!("Authorization: {token}"))
        .output()
        .unwrap();
    assert_eq!(json(&o)["remote"]["uploads"], 1);
    let log = server.access_log();
    assert!(
        log.lines()
            .any(|l| l.starts_with("PUT /ac/") && l.ends_with(token)),
        "{log}"
    );
    for text in [
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    ] {
        assert!(!text.contains("s3cret"), "{text}");
    }

    // Basic credentials in the URL: sent, never printed.
    let c = workspace("auth", "c");
    let with_user = url.replace("http://", "http://ci:pa%24%24word@");
    let o = qpipe(
        &[
            "run",
            RECIPE,
            "--json",
            "--only",
            "strip",
            "--remote-cache",
            &with_user,
        ],
        &c,
    );
    let run = json(&o);
    assert_eq!(run["remote"]["url"], url.as_str());
    assert!(server.access_log().contains("Basic Y2k6cGEkJHdvcmQ="));
    for text in [
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    ] {
        assert!(!text.contains("pa%24") && !text.contains("pa$$"), "{text}");
    }

    // A URL from the recipe gets no credentials, and says so.
    let d = workspace("auth", "d");
    let recipe = d.join(RECIPE);
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "name = \"push_student\"",
        &format!("name = \"push_student\"\nremote_cache = \"{url}/\""),
    );
    std::fs::write(&recipe, text).unwrap();
    let before = server.access_log().lines().count();
    let o = qpipe_cmd(&["run", RECIPE, "--json", "--only", "freeze"], &d)
        .env("QPIPE_REMOTE_HEADER", format!("Authorization: {token}"))
        .output()
        .unwrap();
    let run = json(&o);
    assert_eq!(run["stages"][0]["cache"], "remote", "{run}");
    assert!(
        stderr(&o).contains("QPIPE_REMOTE_HEADER is not sent"),
        "{}",
        stderr(&o)
    );
    let log = server.access_log();
    let new: Vec<&str> = log.lines().skip(before).collect();
    assert!(!new.is_empty());
    assert!(new.iter().all(|l| l.ends_with(" -")), "{new:?}");

    // Credentials written into a recipe are refused before anything runs.
    let e = workspace("auth", "e");
    let recipe = e.join(RECIPE);
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "name = \"push_student\"",
        &format!("name = \"push_student\"\nremote_cache = \"{with_user}\""),
    );
    std::fs::write(&recipe, text).unwrap();
    let o = qpipe(&["run", RECIPE], &e);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("pipeline.remote_cache") && err.contains("credentials"),
        "{err}"
    );
    assert!(!err.contains("pa%24"), "{err}");
}

#[test]
fn shards_then_compare_reproduce_a_full_run() {
    let full = workspace("shards", "full");
    let run = json(&qpipe(&["run", RECIPE, "--json"], &full));
    let n = statuses(&run).len();
    let table = ok_stdout(&qpipe(
        &["compare", RECIPE, "--latency-samples", "0"],
        &full,
    ));

    let server = Nginx::start("shards");
    let url = server.url();
    let planner = workspace("shards", "plan");
    let plan = json(&qpipe(
        &["plan", RECIPE, "--json", "--remote-cache", &url],
        &planner,
    ));
    let variants = plan["variants"].as_array().unwrap().len();
    assert!(variants >= 4, "{plan}");

    // Fewer shards than variants: each shard builds several.
    let shards = 3;
    let mut ran: Vec<String> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for k in 1..=shards {
        let ws = workspace("shards", &format!("shard{k}"));
        let spec = format!("{k}/{shards}");
        let o = qpipe(
            &[
                "run",
                RECIPE,
                "--json",
                "--shard",
                &spec,
                "--remote-cache",
                &url,
            ],
            &ws,
        );
        let r = json(&o);
        assert_eq!(r["ok"], true);
        for (id, status, cache) in statuses(&r) {
            match status.as_str() {
                "ran" => ran.push(id.clone()),
                "cached" => assert_eq!(cache.as_deref(), Some("remote"), "{id} in {spec}"),
                other => panic!("{id}: {other} in shard {spec}"),
            }
            seen.push(id);
        }
        if k > 1 {
            let freeze = statuses(&r).into_iter().find(|s| s.0 == "freeze").unwrap();
            assert_eq!(freeze.2.as_deref(), Some("remote"), "shard {spec}");
        }
    }
    let mut unique = ran.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ran.len(), "a stage was built twice: {ran:?}");
    assert_eq!(ran.len(), n, "every stage built once: {ran:?}");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n);

    // The fan-in machine runs nothing: compare reads the remote.
    let fan_in = workspace("shards", "compare");
    let o = qpipe(
        &[
            "compare",
            RECIPE,
            "--latency-samples",
            "0",
            "--remote-cache",
            &url,
        ],
        &fan_in,
    );
    assert_eq!(ok_stdout(&o), table, "{}", stderr(&o));
    // With times measured, only the ms/sample column may differ.
    let timed = ok_stdout(&qpipe(
        &[
            "compare",
            RECIPE,
            "--format",
            "json",
            "--latency-samples",
            "2",
            "--remote-cache",
            &url,
        ],
        &fan_in,
    ));
    let mut timed: serde_json::Value = serde_json::from_str(&timed).unwrap();
    let mut local: serde_json::Value = serde_json::from_str(&ok_stdout(&qpipe(
        &[
            "compare",
            RECIPE,
            "--format",
            "json",
            "--latency-samples",
            "2",
        ],
        &full,
    )))
    .unwrap();
    for doc in [&mut timed, &mut local] {
        for v in doc["variants"].as_array_mut().unwrap() {
            assert!(v["ms_per_sample"].as_f64().is_some(), "{v}");
            v["ms_per_sample"] = serde_json::Value::Null;
        }
        doc["latency"]["machine"] = serde_json::Value::Null;
    }
    assert_eq!(timed, local);
    let _ = std::io::stdout().flush();
}
