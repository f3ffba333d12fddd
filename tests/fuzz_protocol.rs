//! Fuzzed protocol (issue 12 item 8, DESIGN §7): property tests over every endpoint with wrong
//! types, missing fields, random, truncated and huge bodies, invalid UTF-8, path tricks in names,
//! options and IDs, and random option maps. For every generated request: no panic, a JSON reply,
//! a clear non-empty `{"Err": ...}` where the input is bad, nothing changed on disk (the root's
//! files are compared before and after), and the server keeps serving. Many cases in-process
//! through `protocol::handle`, fewer through the real `serve` process and its socket, plus raw
//! HTTP abuse (truncated bodies, bad framing) only a socket can carry.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use cachedriver::backend::BackendKind;
use cachedriver::driver::{Config, Driver};
use cachedriver::names::CommitMode;
use cachedriver::protocol::{self, Endpoint};
use cachedriver::store::Store;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};

const ENDPOINTS: &[&str] = &[
    "/Plugin.Activate",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
    "/VolumeDriver.Capabilities",
];

/// A volume that exists (created, never mounted) while the fuzzing runs.
const BASE: &str = "fz-base";

/// Every durable thing under `root`: path → (mode, size, content of files).
fn disk(root: &Path) -> BTreeMap<String, (u32, u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            let content = if m.is_file() {
                fs::read(&p).unwrap_or_default()
            } else {
                vec![]
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.display().to_string(),
                (m.mode(), if m.is_dir() { 0 } else { m.size() }, content),
            );
        }
    }
    out
}

/// One generated request and whether it must be refused.
#[derive(Debug, Clone)]
struct Case {
    endpoint: &'static str,
    body: Vec<u8>,
    /// True when the request is invalid and must get `{"Err"}`; false when either reply is fine
    /// (a Remove of an unknown volume is a success that changes nothing).
    must_err: bool,
}

/// Names that can never be a volume: a character outside the alphabet, `..`, a bad first
/// character, empty, or too long.
fn bad_name() -> impl Strategy<Value = String> {
    let poison = prop::sample::select(vec![
        "/", "..", "\0", " ", "\n", "é", "\\", ":", "*", "€", "\u{202e}", "../", "/..", "%2e",
        "\t", "$", "'", "\"", "~", "\u{feff}",
    ]);
    prop_oneof![
        ("[a-z0-9_-]{0,10}", poison, "[a-z0-9_-]{0,10}").prop_map(|(a, p, b)| format!("{a}{p}{b}")),
        Just(String::new()),
        "[-.][a-z0-9_.-]{0,10}",
        "[a-z]{1,8}-[a-z0-9]{129,300}",
        "[a-z]{129,200}",
        Just("../../etc-passwd".to_string()),
        Just("/etc/passwd".to_string()),
        Just(".-.".to_string()),
        "\\PC{1,30}".prop_filter("must hold a non-ASCII char", |s| !s.is_ascii()),
    ]
}

/// IDs Mount refuses: longer than 256 bytes or holding a NUL.
fn bad_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-f0-9]{257,400}",
        ("[a-f0-9]{0,10}", "[a-f0-9]{0,10}").prop_map(|(a, b)| format!("{a}\0{b}")),
    ]
}

/// Option maps Create refuses: an unknown key, a bad commit mode, or a bad cache name.
fn bad_opts() -> impl Strategy<Value = Value> {
    let extra = prop::collection::btree_map("[a-z]{0,6}", "\\PC{0,8}", 0..3);
    prop_oneof![
        (
            "[a-zA-Z_./-]{1,12}".prop_filter("unknown key", |k| k != "cache" && k != "commit"),
            "\\PC{0,10}"
        )
            .prop_map(|(k, v)| json!({ k: v })),
        (
            "\\PC{0,10}".prop_filter("bad mode", |m| !["replace", "merge", "discard"]
                .contains(&m.as_str())),
            extra.clone()
        )
            .prop_map(|(m, e)| {
                let mut o = json!(e);
                o["commit"] = json!(m);
                o
            }),
        bad_name().prop_map(|c| json!({"cache": c})),
        Just(json!({"commit": 1})),
        (1usize..300_000).prop_map(|n| json!({"commit": "m".repeat(n)})),
        (1usize..300_000).prop_map(|n| json!("x".repeat(n))),
        Just(json!({"commit": null})),
        Just(json!(["commit", "merge"])),
        Just(json!("commit=merge")),
    ]
}

/// JSON values of the wrong type for a string field.
fn wrong_type() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        any::<bool>().prop_map(|b| json!(b)),
        Just(Value::Null),
        Just(json!(["fz-base"])),
        Just(json!({"Name": "fz-base"})),
    ]
}

fn name_endpoint() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/VolumeDriver.Create",
        "/VolumeDriver.Remove",
        "/VolumeDriver.Mount",
        "/VolumeDriver.Unmount",
        "/VolumeDriver.Path",
        "/VolumeDriver.Get",
    ])
}

fn case() -> impl Strategy<Value = Case> {
    let c = |endpoint: &'static str, body: Value, must_err: bool| Case {
        endpoint,
        body: body.to_string().into_bytes(),
        must_err,
    };
    prop_oneof![
        // Path tricks in the name, with any ID and options.
        (name_endpoint(), bad_name(), "\\PC{0,20}", bad_opts()).prop_map(move |(ep, n, id, o)| c(
            ep,
            json!({"Name": n, "ID": id, "Opts": o}),
            true
        )),
        // Wrong types.
        (name_endpoint(), wrong_type()).prop_map(move |(ep, v)| c(
            ep,
            json!({"Name": v, "ID": "x"}),
            true
        )),
        (
            prop::sample::select(vec!["/VolumeDriver.Mount", "/VolumeDriver.Unmount"]),
            wrong_type()
        )
            .prop_map(move |(ep, v)| c(ep, json!({"Name": BASE, "ID": v}), true)),
        // (`"Opts": null` is what Docker sends for no options: valid, so not generated here.)
        wrong_type()
            .prop_filter("null Opts is valid", |v| !v.is_null())
            .prop_map(move |v| c(
                "/VolumeDriver.Create",
                json!({"Name": "fz-new", "Opts": v}),
                true
            )),
        // Missing or misspelt fields.
        (
            name_endpoint(),
            prop::sample::select(vec!["name", "NAME", "Volume", ""])
        )
            .prop_map(move |(ep, k)| c(ep, json!({ k: BASE, "ID": "x" }), true)),
        // Bad option maps on an otherwise valid new volume.
        bad_opts().prop_map(move |o| c(
            "/VolumeDriver.Create",
            json!({"Name": "fz-new", "Opts": o}),
            true
        )),
        // Bad IDs on the existing volume.
        (
            prop::sample::select(vec!["/VolumeDriver.Mount", "/VolumeDriver.Unmount"]),
            bad_id()
        )
            .prop_map(move |(ep, id)| c(ep, json!({"Name": BASE, "ID": id}), true)),
        // Any ID: the volume has no session. Unmount is acknowledged and changes nothing (a
        // late Unmount after recovery or the orphan sweep ended the session must not fail the
        // engine's container stop); the on-disk check below still applies.
        "\\PC{0,40}".prop_map(move |id| c(
            "/VolumeDriver.Unmount",
            json!({"Name": BASE, "ID": id}),
            false
        )),
        // Valid names that do not exist.
        (
            prop::sample::select(vec![
                "/VolumeDriver.Mount",
                "/VolumeDriver.Unmount",
                "/VolumeDriver.Path",
                "/VolumeDriver.Get"
            ]),
            "[a-z]{1,6}-[a-z0-9]{1,10}"
        )
            .prop_filter("not the base volume", |(_, n)| n != BASE)
            .prop_map(move |(ep, n)| c(ep, json!({"Name": n, "ID": "x"}), true)),
        "[a-z]{1,6}-[a-z0-9]{1,10}"
            .prop_filter("not the base volume", |n| n != BASE)
            .prop_map(move |n| c("/VolumeDriver.Remove", json!({"Name": n}), false)),
        // Random bytes, truncated JSON, invalid UTF-8.
        (name_endpoint(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(ep, b)| Case {
            endpoint: ep,
            must_err: true,
            body: b
        }),
        (name_endpoint(), any::<prop::sample::Index>()).prop_map(|(ep, i)| {
            let full = json!({"Name": BASE, "ID": "abc", "Opts": {"commit": "merge"}})
                .to_string()
                .into_bytes();
            let cut = i.index(full.len() - 1);
            Case {
                endpoint: ep,
                must_err: true,
                body: full[..cut].to_vec(),
            }
        }),
        (name_endpoint(), prop::collection::vec(0x80u8..=0xff, 1..8)).prop_map(|(ep, bad)| {
            let mut b = br#"{"Name":"fz-"#.to_vec();
            b.extend_from_slice(&bad);
            b.extend_from_slice(br#"","ID":"x"}"#);
            Case {
                endpoint: ep,
                must_err: true,
                body: b,
            }
        }),
        // Deeply nested and huge-ish JSON.
        (name_endpoint(), 1usize..5000).prop_map(|(ep, depth)| Case {
            endpoint: ep,
            must_err: true,
            body: format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes(),
        }),
        (name_endpoint(), 1usize..200_000).prop_map(|(ep, n)| Case {
            endpoint: ep,
            must_err: true,
            body: json!({"Name": "x".repeat(n), "ID": "y"})
                .to_string()
                .into_bytes(),
        }),
        // Endpoints that take no input ignore whatever comes.
        (
            prop::sample::select(vec![
                "/Plugin.Activate",
                "/VolumeDriver.List",
                "/VolumeDriver.Capabilities"
            ]),
            prop::collection::vec(any::<u8>(), 0..100)
        )
            .prop_map(|(ep, b)| Case {
                endpoint: ep,
                must_err: false,
                body: b
            }),
    ]
}

fn check_reply(c: &Case, status: u16, body: &Value) -> Result<(), TestCaseError> {
    if c.must_err {
        let err = body["Err"].as_str().unwrap_or_default();
        prop_assert!(
            err.len() <= 4096,
            "{}: the Err echoes too much of the input ({} bytes): {}...",
            c.endpoint,
            err.len(),
            &err[..err.char_indices().nth(200).map_or(err.len(), |(i, _)| i)]
        );
        prop_assert!(
            status != 200 && !err.trim().is_empty(),
            "{} {:?}: bad input accepted or no clear Err: {status} {body}",
            c.endpoint,
            String::from_utf8_lossy(&c.body[..c.body.len().min(300)])
        );
    } else if status != 200 {
        prop_assert!(
            body["Err"].as_str().is_some_and(|e| !e.trim().is_empty()),
            "{}: an error reply without a clear Err: {status} {body}",
            c.endpoint
        );
    }
    Ok(())
}

#[test]
fn fuzz_in_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let driver = Driver::new(
        Store::open(dir.path()).expect("store"),
        Config {
            backend: BackendKind::Kernel,
            commit: CommitMode::Replace,
            exe: common::exe(),
        },
    )
    .expect("driver");
    let r = protocol::handle(
        &driver,
        Endpoint::Create,
        json!({"Name": BASE}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let before = disk(dir.path());
    let cases = std::env::var("CACHEDRIVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    });
    runner
        .run(&case(), |c| {
            let ep = Endpoint::from_path(c.endpoint).expect("endpoint");
            let reply = protocol::handle(&driver, ep, &c.body);
            check_reply(&c, reply.status, &reply.body)?;
            let after = disk(dir.path());
            prop_assert!(
                after == before,
                "{} {:?} changed the store: {:?}",
                c.endpoint,
                String::from_utf8_lossy(&c.body[..c.body.len().min(200)]),
                after
                    .keys()
                    .filter(|k| !before.contains_key(*k))
                    .chain(before.keys().filter(|k| !after.contains_key(*k)))
                    .collect::<Vec<_>>()
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("protocol fuzz (in-process): {e}"));
    // The valid request still works afterwards.
    let r = protocol::handle(
        &driver,
        Endpoint::Get,
        json!({"Name": BASE}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
}

#[test]
fn fuzz_over_the_socket() {
    if !common::is_root() {
        common::skip(
            "fuzz_protocol::fuzz_over_the_socket",
            "the plugin needs root",
        );
        return;
    }
    let mut p = common::Plugin::new("kernel", None, &[]);
    p.start(None).expect("serve");
    p.ok("/VolumeDriver.Create", json!({"Name": BASE}))
        .expect("create");
    let before = disk(&p.root);
    let alive = |p: &common::Plugin, what: &str| {
        let r = common::call(&p.socket, "/Plugin.Activate", b"");
        assert!(
            matches!(&r, Ok((200, v)) if v["Implements"][0] == "VolumeDriver"),
            "the server stopped serving after {what}: {r:?}\n{}",
            p.log_tail()
        );
    };
    let cases = std::env::var("CACHEDRIVER_FUZZ_SOCKET_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    });
    let t = std::time::Instant::now();
    runner
        .run(&case(), |c| {
            let (status, body) = common::call(&p.socket, c.endpoint, &c.body)
                .map_err(|e| TestCaseError::fail(format!("{}: no reply: {e}", c.endpoint)))?;
            check_reply(&c, status, &body)?;
            prop_assert!(disk(&p.root) == before, "{} changed the store", c.endpoint);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("protocol fuzz (socket): {e}\n{}", p.log_tail()));
    eprintln!(
        "fuzz socket: {cases} generated cases: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    alive(&p, "the generated requests");

    // Abuse only a socket can carry: framing, truncation, sizes, paths.
    let post = |path: &str, headers: &str, body: &[u8]| {
        let mut b =
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n")
                .into_bytes();
        b.extend_from_slice(body);
        b
    };
    let mut raw: Vec<(String, Vec<u8>)> = vec![
        (
            "truncated body".into(),
            post(
                "/VolumeDriver.Create",
                "Content-Length: 100\r\n",
                br#"{"Name":"fz-"#,
            ),
        ),
        (
            "body longer than Content-Length".into(),
            post(
                "/VolumeDriver.Create",
                "Content-Length: 5\r\n",
                br#"{"Name":"fz-trunc"}"#,
            ),
        ),
        (
            "huge Content-Length".into(),
            post(
                "/VolumeDriver.Create",
                "Content-Length: 99999999999\r\n",
                b"{}",
            ),
        ),
        (
            "bad Content-Length".into(),
            post("/VolumeDriver.Create", "Content-Length: -1\r\n", b"{}"),
        ),
        (
            "two Content-Lengths".into(),
            post(
                "/VolumeDriver.Create",
                "Content-Length: 2\r\nContent-Length: 3\r\n",
                b"{}",
            ),
        ),
        (
            "bad chunking".into(),
            post(
                "/VolumeDriver.Create",
                "Transfer-Encoding: chunked\r\n",
                b"zz\r\n{}\r\n0\r\n\r\n",
            ),
        ),
        ("chunked over the cap".into(), {
            let mut b = post(
                "/VolumeDriver.Create",
                "Transfer-Encoding: chunked\r\n",
                b"",
            );
            for _ in 0..40 {
                b.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
                b.extend_from_slice(&vec![b' '; 64 * 1024]);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"0\r\n\r\n");
            b
        }),
        (
            "body over the cap".into(),
            post(
                "/VolumeDriver.Create",
                &format!("Content-Length: {}\r\n", 2 << 20),
                &vec![b'{'; 2 << 20],
            ),
        ),
        (
            "GET".into(),
            b"GET /VolumeDriver.List HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        ),
        (
            "path traversal".into(),
            post("/../../VolumeDriver.Create", "Content-Length: 2\r\n", b"{}"),
        ),
        (
            "encoded path".into(),
            post("/VolumeDriver%2ECreate", "Content-Length: 2\r\n", b"{}"),
        ),
        (
            "query string".into(),
            post(
                "/VolumeDriver.Get?Name=fz-base",
                "Content-Length: 2\r\n",
                b"{}",
            ),
        ),
        ("invalid UTF-8 path".into(), {
            let mut b = b"POST /Volume\xff\xfeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}".to_vec();
            b.truncate(b.len());
            b
        }),
        (
            "garbage request line".into(),
            b"\x00\x01\x02 not http at all\r\n\r\n".to_vec(),
        ),
        ("HTTP/0.9".into(), b"POST /VolumeDriver.Create\r\n".to_vec()),
        (
            "huge header".into(),
            post(
                "/VolumeDriver.Create",
                &format!("X-Big: {}\r\nContent-Length: 2\r\n", "a".repeat(1 << 20)),
                b"{}",
            ),
        ),
        (
            "no body, connection close".into(),
            post("/VolumeDriver.Create", "Connection: close\r\n", b""),
        ),
    ];
    for ep in ENDPOINTS {
        raw.push((
            format!("{ep} with a NUL body"),
            post(ep, "Content-Length: 3\r\n", b"\0\0\0"),
        ));
    }
    for (what, bytes) in &raw {
        let t = std::time::Instant::now();
        // Any reply (or none, for broken framing) is fine; what matters is what follows.
        // A truncated body leaves the server waiting for the rest: give up on the reply soon.
        if let Ok(reply) = common::raw_request(&p.socket, bytes, Duration::from_secs(2)) {
            if let Ok((status, body)) = common::parse_response(&reply) {
                if status != 200 {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        assert!(
                            v["Err"].as_str().is_some_and(|e| !e.is_empty()),
                            "{what}: error reply without a clear Err: {status} {v}"
                        );
                    }
                }
            }
        }
        alive(&p, what);
        assert!(disk(&p.root) == before, "{what} changed the store");
        eprintln!("fuzz socket: {what}: {:.2} s", t.elapsed().as_secs_f64());
    }
    // Many half-open connections at once do not starve the server.
    let idle: Vec<_> = (0..200)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&p.socket).ok())
        .collect();
    alive(&p, "200 idle connections");
    drop(idle);
    p.ok("/VolumeDriver.Remove", json!({"Name": BASE}))
        .expect("remove still works");
    p.stop().expect("clean shutdown");
}
