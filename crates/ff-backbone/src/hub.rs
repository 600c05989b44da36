//! Resolving backbone weights on the Hugging Face hub: the local cache first,
//! then a download that fails fast and clearly when the hub cannot be reached.
//!
//! The cache is `hf-hub`'s (`HF_HOME`), and `HF_ENDPOINT` names a mirror. `hf-hub`
//! 0.4 neither honours `HF_HUB_OFFLINE` nor bounds the time a dead or stalled
//! network takes to fail, so this module adds both: offline mode answers from
//! the cache only, a short TCP connect to the endpoint (or the proxy ureq would
//! use) precedes every download, and the download itself (ours, into the same
//! cache layout) times out every read and resumes a partial file.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, Result};

/// The file every timm hub repository stores its weights in.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The public hub, used when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long the reachability check waits for name resolution and for the
/// TCP connection before declaring the hub unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a hub request waits for the next bytes before declaring the
/// download stalled, unless `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT`
/// say otherwise (the defaults of `huggingface_hub`).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation (`1`, `true`, `yes`, `on`).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The hub endpoint: `HF_ENDPOINT` when set, else the public hub.
pub fn hub_endpoint() -> String {
    match std::env::var("HF_ENDPOINT") {
        Ok(e) if !e.trim().is_empty() => e.trim().trim_end_matches('/').to_string(),
        _ => DEFAULT_ENDPOINT.to_string(),
    }
}

/// The local path of `filename` in hub repository `repo` (a model repo such as
/// `timm/resnet18.tv_in1k`), downloading it into the cache if needed.
///
/// Order: the `hf-hub` cache (`HF_HOME`, default `~/.cache/huggingface`);
/// with `HF_HUB_OFFLINE` set, a missing file is an error; otherwise a quick
/// reachability check of the endpoint, then the download.
pub fn resolve_hub_file(repo: &str, filename: &str) -> Result<PathBuf> {
    let cache = hub_cache(repo)?;
    if let Some(path) = cache.model(repo.to_string()).get(filename) {
        return Ok(path);
    }
    if hub_offline() {
        return Err(Error::Hub {
            repo: repo.to_string(),
            message: format!(
                "HF_HUB_OFFLINE is set and '{filename}' is not in the hub cache under '{}'; \
                 unset HF_HUB_OFFLINE to download it, or pass a local .safetensors file",
                cache.path().display()
            ),
        });
    }
    let endpoint = hub_endpoint();
    check_reachable(&endpoint).map_err(|message| Error::Hub {
        repo: repo.to_string(),
        message: format!(
            "the hub cannot be reached ({message}); download '{filename}' by hand and pass \
             its path, or use random weights"
        ),
    })?;
    download(&cache, repo, filename, &endpoint).map_err(|message| Error::Hub {
        repo: repo.to_string(),
        message,
    })
}

/// `hf-hub` 0.4 sets no read timeout, so a hub (or proxy) that accepts the
/// connection and then stops sending would hang its download forever. This
/// downloader writes the same cache layout (`blobs/<etag>`,
/// `snapshots/<commit>/<file>`, `refs/main`) with a timeout on every read:
/// `HF_HUB_ETAG_TIMEOUT` for the metadata request and `HF_HUB_DOWNLOAD_TIMEOUT`
/// between two reads of the body (seconds, as in `huggingface_hub`; default
/// [`DEFAULT_READ_TIMEOUT`]). A stalled or broken body leaves
/// `blobs/<etag>.part` behind, which the next attempt resumes with a `Range`
/// request.
fn download(
    cache: &hf_hub::Cache,
    repo: &str,
    filename: &str,
    endpoint: &str,
) -> std::result::Result<PathBuf, String> {
    let url = format!("{endpoint}/{repo}/resolve/main/{filename}");
    let token = cache.token();
    let agent = |redirects: u32, read_timeout: Duration| {
        ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(read_timeout)
            .timeout_write(read_timeout)
            .redirects(redirects)
            .build()
    };
    let request = |agent: &ureq::Agent, url: &str, range: &str| {
        let mut req = agent.get(url).set("Range", range);
        if let Some(token) = &token {
            req = req.set("Authorization", &format!("Bearer {token}"));
        }
        req.call().map_err(|e| format!("{url}: {e}"))
    };

    // The commit and the etag come from the first response, before any
    // redirect to a CDN (which knows neither).
    let meta_timeout = env_seconds("HF_HUB_ETAG_TIMEOUT");
    let first = request(&agent(0, meta_timeout), &url, "bytes=0-0")?;
    let commit = first
        .header("x-repo-commit")
        .ok_or_else(|| format!("{url}: the response has no x-repo-commit header"))?
        .to_string();
    let etag = first
        .header("x-linked-etag")
        .or_else(|| first.header("etag"))
        .ok_or_else(|| format!("{url}: the response has no etag header"))?
        .replace('"', "");
    if etag.is_empty() || etag.contains(['/', '\\']) || commit.contains(['/', '\\']) {
        return Err(format!(
            "{url}: unusable etag '{etag}' or commit '{commit}'"
        ));
    }
    let body_url = if (300..400).contains(&first.status()) {
        let location = first
            .header("location")
            .ok_or_else(|| format!("{url}: a redirect without a location"))?;
        if location.starts_with('/') {
            // Relative to the endpoint's origin (scheme, host and port).
            let after_scheme = url.find("://").map_or(0, |i| i + 3);
            let origin_end = url[after_scheme..]
                .find('/')
                .map_or(url.len(), |i| after_scheme + i);
            format!("{}{location}", &url[..origin_end])
        } else {
            location.to_string()
        }
    } else {
        url.clone()
    };
    // Drain the one-byte body so the connection closes cleanly.
    let _ = std::io::copy(
        &mut std::io::Read::take(first.into_reader(), 1 << 16),
        &mut std::io::sink(),
    );

    let repo_dir = cache
        .path()
        .join(hf_hub::Repo::model(repo.to_string()).folder_name());
    let blob = repo_dir.join("blobs").join(&etag);
    let io = |what: &str, path: &std::path::Path, e: std::io::Error| {
        format!("{what} '{}': {e}", path.display())
    };
    if !blob.exists() {
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| io("cannot create", &blobs, e))?;
        let part = blobs.join(format!("{etag}.part"));
        fetch_body(
            &agent(5, env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")),
            &body_url,
            token.as_deref(),
            &part,
        )?;
        std::fs::rename(&part, &blob).map_err(|e| io("cannot rename", &part, e))?;
    }
    let snapshot = repo_dir.join("snapshots").join(&commit);
    std::fs::create_dir_all(&snapshot).map_err(|e| io("cannot create", &snapshot, e))?;
    let pointer = snapshot.join(filename);
    if !pointer.exists() {
        link_or_copy(&blob, &pointer, &etag).map_err(|e| io("cannot create", &pointer, e))?;
    }
    cache
        .model(repo.to_string())
        .create_ref(&commit)
        .map_err(|e| io("cannot write the ref of", &repo_dir, e))?;
    Ok(pointer)
}

/// Appends the body of `url` to `part`, starting where an earlier attempt
/// stopped, until the server's stated length is reached.
fn fetch_body(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    part: &std::path::Path,
) -> std::result::Result<(), String> {
    use std::io::{Read, Write};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(|e| format!("cannot open '{}': {e}", part.display()))?;
    let mut have = file
        .metadata()
        .map_err(|e| format!("cannot read '{}': {e}", part.display()))?
        .len();
    let mut req = agent.get(url).set("Range", &format!("bytes={have}-"));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let response = req.call().map_err(|e| format!("{url}: {e}"))?;
    // 416: the part file already holds the whole body.
    let total = match response.status() {
        206 => response
            .header("content-range")
            .and_then(|r| r.rsplit('/').next())
            .and_then(|n| n.parse::<u64>().ok()),
        200 => {
            // The server ignored the range: start over.
            file.set_len(0)
                .map_err(|e| format!("cannot truncate '{}': {e}", part.display()))?;
            have = 0;
            response
                .header("content-length")
                .and_then(|n| n.parse::<u64>().ok())
        }
        s => return Err(format!("{url}: unexpected status {s}")),
    };
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.flush();
                return Err(format!(
                    "{url}: the download stalled or broke after {have} bytes ({e}); \
                     rerun to resume from '{}'",
                    part.display()
                ));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| format!("cannot write '{}': {e}", part.display()))?;
        have += n as u64;
    }
    file.sync_all()
        .map_err(|e| format!("cannot write '{}': {e}", part.display()))?;
    match total {
        Some(total) if total != have => Err(format!(
            "{url}: the download ended after {have} of {total} bytes; rerun to resume from '{}'",
            part.display()
        )),
        _ => Ok(()),
    }
}

/// A relative symbolic link from a snapshot entry to its blob, as the hub's
/// own clients make (a copy where links are not available).
fn link_or_copy(
    blob: &std::path::Path,
    pointer: &std::path::Path,
    etag: &str,
) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let _ = blob;
        std::os::unix::fs::symlink(std::path::Path::new("../../blobs").join(etag), pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = etag;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

/// The read timeout a hub request waits between two reads: the environment
/// variable `name` in seconds, else [`DEFAULT_READ_TIMEOUT`].
fn env_seconds(name: &str) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_READ_TIMEOUT)
}

/// The `hf-hub` cache: `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
///
/// `hf-hub` panics when it finds no home directory, so without `HF_HOME` a
/// home directory must be known from the environment; otherwise this is an
/// error that says to set `HF_HOME`.
fn hub_cache(repo: &str) -> Result<hf_hub::Cache> {
    let has = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if has("HF_HOME") || has("HOME") || has("USERPROFILE") {
        Ok(hf_hub::Cache::from_env())
    } else {
        Err(Error::Hub {
            repo: repo.to_string(),
            message: "no home directory is known for the hub cache; set HF_HOME".to_string(),
        })
    }
}

/// The host and port a connection to `url` starts with.
///
/// Accepts `scheme://[user@]host[:port][/path]`, with IPv6 hosts in brackets;
/// the port defaults to 443 for https and 80 for http.
pub fn host_port(url: &str) -> std::result::Result<(String, u16), String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => ("https".to_string(), url),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        "socks4" | "socks4a" | "socks5" | "socks5h" | "socks" => 1080,
        other => return Err(format!("unsupported scheme '{other}' in '{url}'")),
    };
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        let (h, after) = stripped
            .split_once(']')
            .ok_or_else(|| format!("malformed IPv6 host in '{url}'"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in '{url}'"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("invalid port '{p}' in '{url}'"))?,
        None => default_port,
    };
    Ok((host, port))
}

/// The proxy URL ureq would use for `endpoint`, from the same environment
/// variables it reads.
fn proxy_for(endpoint: &str) -> Option<String> {
    let https = endpoint.to_ascii_lowercase().starts_with("https");
    let names: &[&str] = if https {
        &["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"]
    } else {
        &["ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"]
    };
    names
        .iter()
        .filter_map(|n| std::env::var(n).ok())
        .find(|v| !v.trim().is_empty())
}

/// Checks within [`CONNECT_TIMEOUT`] (twice at most: name resolution, then the
/// connect) that a TCP connection to `endpoint`, or to the proxy in front of
/// it, can be opened. The message says what failed.
pub fn check_reachable(endpoint: &str) -> std::result::Result<(), String> {
    let (target, what) = match proxy_for(endpoint) {
        Some(proxy) => (proxy.clone(), format!("proxy {proxy} for {endpoint}")),
        None => (endpoint.to_string(), endpoint.to_string()),
    };
    let (host, port) = host_port(&target)?;
    let addrs =
        resolve_with_timeout(&host, port, CONNECT_TIMEOUT).map_err(|e| format!("{what}: {e}"))?;
    let mut last_error = String::from("no address");
    for addr in addrs.iter().take(4) {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last_error = format!("connecting to {addr} failed: {e}"),
        }
    }
    Err(format!("{what}: {last_error}"))
}

/// Resolves `host:port` on a helper thread so that a resolver that never
/// answers cannot block the caller longer than `timeout`.
fn resolve_with_timeout(
    host: &str,
    port: u16,
    timeout: Duration,
) -> std::result::Result<Vec<SocketAddr>, String> {
    let (tx, rx) = mpsc::channel();
    let query = (host.to_string(), port);
    std::thread::spawn(move || {
        let result = query
            .to_socket_addrs()
            .map(|a| a.collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        // The receiver may have given up already; nothing is left to tell then.
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(format!("'{host}' resolved to no address")),
        Ok(Err(e)) => Err(format!("cannot resolve '{host}': {e}")),
        Err(_) => Err(format!(
            "resolving '{host}' took longer than {} s",
            timeout.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parses_endpoints() {
        assert_eq!(
            host_port("https://huggingface.co").unwrap(),
            ("huggingface.co".to_string(), 443)
        );
        assert_eq!(
            host_port("http://127.0.0.1:9").unwrap(),
            ("127.0.0.1".to_string(), 9)
        );
        assert_eq!(
            host_port("http://user:pw@proxy.local:3128/").unwrap(),
            ("proxy.local".to_string(), 3128)
        );
        assert_eq!(
            host_port("https://[::1]:8443/mirror").unwrap(),
            ("::1".to_string(), 8443)
        );
        assert_eq!(
            host_port("http://mirror.example").unwrap(),
            ("mirror.example".to_string(), 80)
        );
        assert!(host_port("ftp://x").is_err());
        assert!(host_port("http://:80").is_err());
        assert!(host_port("http://h:notaport").is_err());
    }
}
