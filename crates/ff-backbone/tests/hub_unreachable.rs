//! The hub weight source when the hub fails: a clear error naming the
//! repository and the endpoint within seconds, never a hang, and a partial
//! download that the next attempt resumes.
//!
//! Every server here is a local listener on 127.0.0.1: a closed port
//! (refused), one that accepts and never answers, one that stalls after the
//! headers, one that stalls mid-body, and one that serves the file honouring
//! `Range`. This file is its own test binary and holds one test, because it
//! changes process-wide environment variables that other tests must not see.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use ff_backbone::hub::resolve_hub_file;
use ff_backbone::{Backbone, BackboneKind, Error, WeightSource};

const REPO: &str = "timm/wide_resnet50_2.racm_in1k";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const ETAG: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What the local server does with each request.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Accept, read nothing, send nothing.
    Silent,
    /// Answer the metadata request; send only the body request's headers.
    StallAfterHeaders,
    /// Answer the metadata request; send half of the body, then nothing.
    StallMidBody,
    /// Serve the file, honouring `Range`.
    Serve,
}

struct Server {
    endpoint: String,
    /// The `Range` header of every request received, in order.
    ranges: Arc<Mutex<Vec<String>>>,
}

/// A loopback HTTP server in `mode` serving `payload` as every file; its
/// threads hold stalled connections open for `hold`, then end by themselves.
fn serve(mode: Mode, payload: &'static [u8], hold: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let endpoint = format!("http://{}", listener.local_addr().expect("local addr"));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ranges);
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + hold;
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let seen = Arc::clone(&seen);
                    std::thread::spawn(move || answer(stream, mode, payload, hold, &seen));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Server { endpoint, ranges }
}

fn answer(
    mut stream: TcpStream,
    mode: Mode,
    payload: &[u8],
    hold: Duration,
    seen: &Mutex<Vec<String>>,
) {
    stream.set_nonblocking(false).expect("blocking");
    if mode == Mode::Silent {
        std::thread::sleep(hold);
        return;
    }
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut range = String::new();
    let mut lines = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        lines += 1;
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
            range = v.trim().to_string();
        }
    }
    if lines == 0 {
        // The reachability check: a connection that sends no request.
        return;
    }
    seen.lock().expect("lock").push(range.clone());
    let start: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let total = payload.len();
    let metadata_request = range == "bytes=0-0";
    let end = if metadata_request { 1 } else { total };
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nx-repo-commit: {COMMIT}\r\netag: \"{ETAG}\"\r\n\
         content-range: bytes {start}-{}/{total}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        end - 1,
        end - start
    );
    let _ = stream.write_all(head.as_bytes());
    let body = &payload[start..end];
    match mode {
        Mode::StallAfterHeaders if !metadata_request => std::thread::sleep(hold),
        Mode::StallMidBody if !metadata_request => {
            let _ = stream.write_all(&body[..body.len() / 2]);
            let _ = stream.flush();
            std::thread::sleep(hold);
        }
        _ => {
            let _ = stream.write_all(body);
        }
    }
}

fn hub_error(what: &str, endpoint: &str, err: &Error) -> String {
    match err {
        Error::Hub { repo, message } => {
            assert_eq!(repo, REPO, "{what}");
            assert!(message.contains(endpoint), "{what}: {message}");
            message.clone()
        }
        other => panic!("{what}: expected a hub error, got {other:?}"),
    }
}

#[test]
fn failing_hubs_fail_fast_and_partial_downloads_resume() {
    let home = tempfile::tempdir().expect("tempdir");
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_OFFLINE");
    for proxy in [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ] {
        std::env::remove_var(proxy);
    }
    std::env::set_var("HF_HUB_ETAG_TIMEOUT", "1");
    std::env::set_var("HF_HUB_DOWNLOAD_TIMEOUT", "1");
    let kind = BackboneKind::WideResNet50_2;
    let source = WeightSource::hub(kind);
    // A hang guard, not a speed test: every timeout here is 1-3 s, so 30 s can
    // only be exceeded by a wait that no timeout bounded.
    let guard = Duration::from_secs(30);
    let hold = Duration::from_secs(40);

    // A closed loopback port: a port just bound and released.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    std::env::set_var("HF_ENDPOINT", &closed);
    let start = Instant::now();
    let err = Backbone::load(kind, &source, &Device::Cpu).expect_err("refused: must fail");
    assert!(start.elapsed() < guard, "refused: {:?}", start.elapsed());
    let message = hub_error("refused", &closed, &err);
    assert!(message.contains("cannot be reached"), "{message}");

    // Accepts the connection, never answers: the metadata read times out.
    let silent = serve(Mode::Silent, b"unused", hold);
    std::env::set_var("HF_ENDPOINT", &silent.endpoint);
    let start = Instant::now();
    let err = Backbone::load(kind, &source, &Device::Cpu).expect_err("silent: must fail");
    assert!(start.elapsed() < guard, "silent: {:?}", start.elapsed());
    hub_error("silent", &silent.endpoint, &err);

    // The file: 4000 bytes that are not weights (resolve_hub_file only
    // downloads; loading them is another test's business).
    static PAYLOAD: [u8; 4000] = {
        let mut p = [0u8; 4000];
        let mut i = 0;
        while i < p.len() {
            p[i] = (i * 7 % 251) as u8;
            i += 1;
        }
        p
    };
    let blob = home
        .path()
        .join("hub/models--timm--wide_resnet50_2.racm_in1k/blobs")
        .join(ETAG);
    let part = blob.with_file_name(format!("{ETAG}.part"));

    // Headers, then silence: a stall error within the read timeout.
    let headers_only = serve(Mode::StallAfterHeaders, &PAYLOAD, hold);
    std::env::set_var("HF_ENDPOINT", &headers_only.endpoint);
    let start = Instant::now();
    let err = Backbone::load(kind, &source, &Device::Cpu).expect_err("stall: must fail");
    assert!(start.elapsed() < guard, "stall: {:?}", start.elapsed());
    let message = hub_error("stall after headers", &headers_only.endpoint, &err);
    assert!(message.contains("stalled"), "{message}");
    assert!(
        !blob.exists(),
        "a stalled download must not become the blob"
    );

    // Half of the body, then silence: the half stays in the part file.
    let mid = serve(Mode::StallMidBody, &PAYLOAD, hold);
    std::env::set_var("HF_ENDPOINT", &mid.endpoint);
    let start = Instant::now();
    let err = resolve_hub_file(REPO, "model.safetensors").expect_err("mid-body: must fail");
    assert!(start.elapsed() < guard, "mid-body: {:?}", start.elapsed());
    let message = hub_error("stall mid-body", &mid.endpoint, &err);
    assert!(
        message.contains("stalled") && message.contains("resume"),
        "{message}"
    );
    let kept = std::fs::read(&part).expect("the part file stays for a resume");
    assert_eq!(kept, PAYLOAD[..PAYLOAD.len() / 2]);

    // A working server: the download resumes from the part file's length.
    let good = serve(Mode::Serve, &PAYLOAD, Duration::from_secs(10));
    std::env::set_var("HF_ENDPOINT", &good.endpoint);
    let path = resolve_hub_file(REPO, "model.safetensors").expect("resumed download");
    let mut got = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut got))
        .expect("read the downloaded file");
    assert_eq!(got, PAYLOAD);
    assert!(!part.exists(), "the part file became the blob");
    let ranges = good.ranges.lock().expect("lock").clone();
    assert_eq!(ranges, ["bytes=0-0".to_string(), "bytes=2000-".to_string()]);

    // Now cached: found offline, without any server.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    std::env::set_var("HF_ENDPOINT", &closed);
    let again = resolve_hub_file(REPO, "model.safetensors").expect("cached");
    assert_eq!(std::fs::read(again).expect("read"), PAYLOAD);
}
