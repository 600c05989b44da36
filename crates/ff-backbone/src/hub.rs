//! Resolving backbone weights on the Hugging Face hub: the local cache first,
//! then a download that fails fast and clearly when the hub cannot be reached.
//!
//! `hf-hub` 0.4 reads `HF_HOME` (cache location) and `HF_ENDPOINT` (mirror) but
//! neither honours `HF_HUB_OFFLINE` nor bounds the time a dead network takes to
//! fail, so this module adds both: offline mode answers from the cache only, and
//! a short TCP connect to the endpoint (or the proxy ureq would use) precedes
//! every download.

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
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| Error::Hub {
            repo: repo.to_string(),
            message: format!("cannot set up the hub client: {e}"),
        })?;
    api.model(repo.to_string())
        .get(filename)
        .map_err(|e| Error::Hub {
            repo: repo.to_string(),
            message: format!("downloading '{filename}' from {endpoint} failed: {e}"),
        })
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
