//! `download-mvtec`: fetch the official MVTec AD archives, resumably (HTTP
//! Range into a `.part` file), check their size and, where it is known, their
//! SHA-256, and extract them with the system `tar`. Without a network it fails
//! within seconds and says how to place the data by hand.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

/// The MVTec AD page where the dataset is offered (and its licence, CC BY-NC-SA 4.0).
pub const MVTEC_PAGE: &str = "https://www.mvtec.com/company/research/datasets/mvtec-ad";

/// The whole dataset in one archive, as MVTec's download page links it (the
/// same link anomalib's MVTec AD datamodule uses).
pub const FULL_ARCHIVE_URL: &str = "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/mvtec_anomaly_detection.tar.xz";
pub const FULL_ARCHIVE_NAME: &str = "mvtec_anomaly_detection.tar.xz";
/// Size and SHA-256 of the full archive (anomalib's `DownloadInfo` hash; the
/// size as reported by several independent downloads of it).
pub const FULL_ARCHIVE_SIZE: u64 = 5_264_982_680;
pub const FULL_ARCHIVE_SHA256: &str =
    "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d";

/// MVTec's per-category archives (links from MVTec's download page). Their
/// checksums are not published; their size is checked against the server's
/// `Content-Length`.
pub const CATEGORY_URLS: [(&str, &str); 15] = [
    ("bottle", "https://www.mydrive.ch/shares/150452/132a93367fb17cdf968dfb5c4013f6e7/download/420937370-1629958698/bottle.tar.xz"),
    ("cable", "https://www.mydrive.ch/shares/150453/10f960e07fec2838b2cd512586633a32/download/420937413-1629958794/cable.tar.xz"),
    ("capsule", "https://www.mydrive.ch/shares/150454/e0ce6dd74eb150f46c0d98131b3703f2/download/420937454-1629958872/capsule.tar.xz"),
    ("carpet", "https://www.mydrive.ch/shares/150455/eac7fbce84d93a5094e13f391170eca4/download/420937484-1629959013/carpet.tar.xz"),
    ("grid", "https://www.mydrive.ch/shares/150456/bb0b2e3dc804ccb8b4485e01f8e4493b/download/420937487-1629959044/grid.tar.xz"),
    ("hazelnut", "https://www.mydrive.ch/shares/150457/51d49f65e84bdc100ff8035d7dd783ea/download/420937545-1629959162/hazelnut.tar.xz"),
    ("leather", "https://www.mydrive.ch/shares/150458/923030ce14e10a7d147e95d0f8885f6b/download/420937607-1629959262/leather.tar.xz"),
    ("metal_nut", "https://www.mydrive.ch/shares/150459/c68856a21dca589b0f8ff6d4ee0f18f4/download/420937637-1629959294/metal_nut.tar.xz"),
    ("pill", "https://www.mydrive.ch/shares/150460/d4f1c04da67034ccc8d8b5fa3e73f244/download/420938129-1629960351/pill.tar.xz"),
    ("screw", "https://www.mydrive.ch/shares/150461/242f454cc6385e5693c4fd4b94567d1e/download/420938130-1629960389/screw.tar.xz"),
    ("tile", "https://www.mydrive.ch/shares/150462/5479f0fdc97bc6fa16eab0cb0cf0109f/download/420938133-1629960456/tile.tar.xz"),
    ("toothbrush", "https://www.mydrive.ch/shares/150463/895a1a5fb84b958f07417784b060434b/download/420938134-1629960477/toothbrush.tar.xz"),
    ("transistor", "https://www.mydrive.ch/shares/150464/99b8ea0332438d64fcc2475ee73f9c29/download/420938166-1629960554/transistor.tar.xz"),
    ("wood", "https://www.mydrive.ch/shares/150465/d5b4115b720cdb54d217e75636e6e374/download/420938383-1629960649/wood.tar.xz"),
    ("zipper", "https://www.mydrive.ch/shares/150466/bd155b557520edaf692d9bfdb915c24a/download/420938385-1629960680/zipper.tar.xz"),
];

/// How long to wait for a TCP connection. Short, so that a machine without
/// network gets its answer within seconds instead of hanging.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stalled transfer may stay silent before it is an error (the
/// `.part` file keeps what arrived; a rerun resumes).
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable that replaces the MVTec host: archives are then
/// fetched from `<base>/<file name>` (a mirror, or a local server in tests).
pub const BASE_URL_ENV: &str = "FF_MVTEC_BASE_URL";

/// Marker written into a category folder once its extraction finished.
const DONE_MARKER: &str = ".xtask-download-complete";

/// One archive to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// File name of the archive (`bottle.tar.xz`).
    pub name: String,
    pub url: String,
    /// Expected size in bytes, when known in advance.
    pub size: Option<u64>,
    /// Expected SHA-256 (lower-case hex), when known.
    pub sha256: Option<String>,
    /// The categories it holds.
    pub categories: Vec<String>,
}

/// Options of `download-mvtec`.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    pub out: PathBuf,
    /// Categories to fetch one by one; empty = the full archive.
    pub categories: Vec<String>,
    /// Replaces the MVTec host (see [`BASE_URL_ENV`]).
    pub base_url: Option<String>,
    /// Keep the archives after extraction.
    pub keep_archives: bool,
    /// Extract again even where a finished extraction is found.
    pub force: bool,
}

/// The archives for a request: the full archive when no category is named,
/// else one archive per category. With a base URL the file names stay and the
/// host changes; known sizes and checksums still apply (a mirror must serve
/// the same bytes).
pub fn archives_for(categories: &[String], base_url: Option<&str>) -> anyhow::Result<Vec<Archive>> {
    let relocate = |name: &str, url: &str| match base_url {
        Some(base) => format!("{}/{}", base.trim_end_matches('/'), name),
        None => url.to_string(),
    };
    if categories.is_empty() {
        return Ok(vec![Archive {
            name: FULL_ARCHIVE_NAME.into(),
            url: relocate(FULL_ARCHIVE_NAME, FULL_ARCHIVE_URL),
            size: Some(FULL_ARCHIVE_SIZE),
            sha256: Some(FULL_ARCHIVE_SHA256.into()),
            categories: CATEGORY_URLS.iter().map(|(c, _)| c.to_string()).collect(),
        }]);
    }
    let mut out: Vec<Archive> = Vec::new();
    for cat in categories {
        let (_, url) = CATEGORY_URLS
            .iter()
            .find(|(c, _)| c == cat)
            .with_context(|| {
                format!(
                    "{cat:?} is not an MVTec AD category (one of: {})",
                    CATEGORY_URLS.map(|(c, _)| c).join(", ")
                )
            })?;
        let name = format!("{cat}.tar.xz");
        if out.iter().any(|a| a.name == name) {
            continue;
        }
        out.push(Archive {
            url: relocate(&name, url),
            name,
            size: None,
            sha256: None,
            categories: vec![cat.clone()],
        });
    }
    Ok(out)
}

/// How to get the data without this command, shown with every download error.
pub fn manual_instructions(out: &Path) -> String {
    format!(
        "To place the data by hand: download MVTec AD from {MVTEC_PAGE} \
         (the whole {FULL_ARCHIVE_NAME}, {:.1} GB, or one <category>.tar.xz per category) and \
         extract it with `tar -xJf <archive> -C {out}`, so that the layout is\n  \
         {out}/<category>/train/good/*.png\n  \
         {out}/<category>/test/<defect>/*.png   (test/good holds the normal test images)\n  \
         {out}/<category>/ground_truth/<defect>/<name>_mask.png\n\
         with <category> one of: {}. A mirror can be used with --base-url or {BASE_URL_ENV}.",
        FULL_ARCHIVE_SIZE as f64 / 1e9,
        CATEGORY_URLS.map(|(c, _)| c).join(", "),
        out = out.display(),
    )
}

/// The error first, then how to do without this command: the cause is what
/// the user reads first, the instructions what they act on.
fn with_instructions(e: anyhow::Error, out: &Path) -> anyhow::Error {
    anyhow::anyhow!("{e:#}\n\n{}", manual_instructions(out))
}

/// Whether a category folder holds a finished extraction.
fn category_done(out: &Path, category: &str) -> bool {
    out.join(category).join(DONE_MARKER).exists()
}

/// Runs `download-mvtec`.
pub fn download_mvtec(opts: &DownloadOptions) -> anyhow::Result<()> {
    let base = opts
        .base_url
        .clone()
        .or_else(|| std::env::var(BASE_URL_ENV).ok().filter(|s| !s.is_empty()));
    let archives = archives_for(&opts.categories, base.as_deref())?;
    fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout_read(READ_TIMEOUT)
        .user_agent(concat!("fastflow-rs-xtask/", env!("CARGO_PKG_VERSION")))
        .build();
    for archive in &archives {
        if !opts.force
            && archive
                .categories
                .iter()
                .all(|c| category_done(&opts.out, c))
        {
            eprintln!(
                "{}: already extracted in {} (pass --force to redo)",
                archive.name,
                opts.out.display()
            );
            continue;
        }
        let path = opts.out.join(&archive.name);
        let have_verified = path.exists() && verify(&path, archive).is_ok();
        if !have_verified {
            fetch(&agent, archive, &path).map_err(|e| with_instructions(e, &opts.out))?;
        }
        extract(&path, &opts.out, &archive.categories)
            .map_err(|e| with_instructions(e, &opts.out))?;
        if !opts.keep_archives {
            fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    eprintln!(
        "MVTec AD is in {} (licence CC BY-NC-SA 4.0, see {MVTEC_PAGE})",
        opts.out.display()
    );
    Ok(())
}

/// Downloads `archive` to `dest`, resuming from `dest.part` when an earlier
/// attempt left one, then checks size and checksum and renames the part file.
pub fn fetch(agent: &ureq::Agent, archive: &Archive, dest: &Path) -> anyhow::Result<()> {
    let part = part_path(dest);
    let mut have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if let Some(size) = archive.size {
        if have > size {
            // More bytes than the archive has: the part file is not ours.
            fs::remove_file(&part).with_context(|| format!("cannot remove {}", part.display()))?;
            have = 0;
        }
    }
    let complete_already = archive.size.is_some_and(|s| s == have && have > 0);
    if !complete_already {
        download_to_part(agent, archive, &part, have)?;
    }
    if let Err(e) = verify(&part, archive) {
        // A part file that is complete in length but wrong in content cannot
        // be resumed into a right one; start over on the next run.
        let _ = fs::remove_file(&part);
        return Err(e.context(format!(
            "{} was removed; run the command again to download it afresh",
            part.display()
        )));
    }
    fs::rename(&part, dest)
        .with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
    Ok(())
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// One HTTP request: ask for the bytes from `have` on, append them to the
/// part file, and check that exactly the announced number arrived.
fn download_to_part(
    agent: &ureq::Agent,
    archive: &Archive,
    part: &Path,
    have: u64,
) -> anyhow::Result<()> {
    let host = archive
        .url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or(&archive.url)
        .to_string();
    let mut req = agent.get(&archive.url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
        eprintln!("{}: resuming at {}", archive.name, human_bytes(have));
    } else {
        eprintln!("{}: downloading {}", archive.name, archive.url);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) if have > 0 => {
            // The server has nothing after `have`: the part file already holds
            // the whole archive (size unknown in advance) or is bad; the
            // verification after this decides.
            return Ok(());
        }
        Err(ureq::Error::Status(code, r)) => bail!(
            "{} answered HTTP {code} {} for {} (the share link may have moved; \
             see {MVTEC_PAGE} for the current one)",
            host,
            r.status_text(),
            archive.url
        ),
        Err(ureq::Error::Transport(t)) => {
            bail!("cannot reach {host} ({t}); no network, or the host is down")
        }
    };
    let (mut file, start) = if resp.status() == 206 {
        let start = content_range_start(resp.header("Content-Range"))
            .context("the server answered 206 without a valid Content-Range")?;
        if start != have {
            bail!(
                "asked to resume {} at byte {have}, the server resumed at {start}",
                archive.name
            );
        }
        let f = OpenOptions::new()
            .append(true)
            .open(part)
            .with_context(|| format!("cannot open {}", part.display()))?;
        (f, have)
    } else {
        if have > 0 {
            eprintln!(
                "{}: the server does not resume downloads; starting over",
                archive.name
            );
        }
        let f = File::create(part).with_context(|| format!("cannot create {}", part.display()))?;
        (f, 0)
    };
    let announced: Option<u64> = resp
        .header("Content-Length")
        .and_then(|v| v.trim().parse().ok());
    let total = announced.map(|n| n + start);
    if let (Some(total), Some(size)) = (total, archive.size) {
        if total != size {
            bail!(
                "{} would be {total} bytes; {} are expected. The server offers another file; \
                 check the link on {MVTEC_PAGE}",
                archive.name,
                size
            );
        }
    }
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got: u64 = 0;
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the download of {} broke off after {} (kept in {}; run the command again to resume)",
                        archive.name,
                        human_bytes(start + got),
                        part.display()
                    )
                })
            }
        };
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", part.display()))?;
        got += n as u64;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let rate = got as f64 / t0.elapsed().as_secs_f64().max(1e-3);
            let of = total
                .map(|t| format!(" of {}", human_bytes(t)))
                .unwrap_or_default();
            eprintln!(
                "{}: {}{of} ({}/s)",
                archive.name,
                human_bytes(start + got),
                human_bytes(rate as u64)
            );
        }
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", part.display()))?;
    if let Some(n) = announced {
        if got != n {
            bail!(
                "the download of {} ended after {} of {} announced bytes (kept in {}; run the \
                 command again to resume)",
                archive.name,
                got,
                n,
                part.display()
            );
        }
    }
    Ok(())
}

/// The first byte of a `Content-Range: bytes <start>-<end>/<total>` header.
fn content_range_start(v: Option<&str>) -> Option<u64> {
    let v = v?.trim().strip_prefix("bytes")?.trim();
    v.split('-').next()?.trim().parse().ok()
}

/// Checks a downloaded file's size and SHA-256 where they are known.
pub fn verify(path: &Path, archive: &Archive) -> anyhow::Result<()> {
    let len = fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if let Some(size) = archive.size {
        if len != size {
            bail!(
                "{} has {len} bytes where {} are expected",
                path.display(),
                size
            );
        }
    }
    if len == 0 {
        bail!("{} is empty", path.display());
    }
    if let Some(expected) = &archive.sha256 {
        eprintln!("{}: checking SHA-256", archive.name);
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = Sha256::new();
        io::copy(&mut f, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
        let got = hex(&hasher.finalize());
        if got != *expected {
            bail!("{} has SHA-256 {got}, expected {expected}", path.display());
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Extracts an archive into `out` with the system `tar` (GNU tar and bsdtar
/// both refuse absolute and `..` member paths by default), then checks that
/// every expected category has the MVTec layout and marks it finished.
pub fn extract(archive: &Path, out: &Path, categories: &[String]) -> anyhow::Result<()> {
    eprintln!("extracting {} into {}", archive.display(), out.display());
    let status = Command::new("tar")
        .arg("-xJf")
        .arg(archive)
        .arg("-C")
        .arg(out)
        .arg("--no-same-owner")
        .status()
        .context("cannot run `tar` (needed to extract .tar.xz archives; install tar and xz)")?;
    if !status.success() {
        bail!("`tar -xJf {}` failed ({status})", archive.display());
    }
    for cat in categories {
        let root = out.join(cat);
        for sub in ["train/good", "test/good", "ground_truth"] {
            if !root.join(sub).is_dir() {
                bail!(
                    "{} has no {sub}/ after extracting {}: not the MVTec AD layout",
                    root.display(),
                    archive.display()
                );
            }
        }
        fs::write(
            root.join(DONE_MARKER),
            "extracted by cargo xtask download-mvtec\n",
        )
        .with_context(|| format!("cannot write into {}", root.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(Duration::from_secs(10))
            .build()
    }

    #[test]
    fn content_range_and_sizes_are_read_and_printed() {
        assert_eq!(
            content_range_start(Some("bytes 70000-199999/200000")),
            Some(70000)
        );
        assert_eq!(content_range_start(Some("bytes */200000")), None);
        assert_eq!(content_range_start(None), None);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(FULL_ARCHIVE_SIZE), "4.9 GiB");
    }

    #[test]
    fn archives_follow_the_request() {
        let full = archives_for(&[], None).unwrap();
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].url, FULL_ARCHIVE_URL);
        assert_eq!(full[0].categories.len(), 15);
        assert_eq!(full[0].sha256.as_deref(), Some(FULL_ARCHIVE_SHA256));

        let two = archives_for(
            &["screw".into(), "bottle".into(), "screw".into()],
            Some("http://mirror.example/mvtec/"),
        )
        .unwrap();
        let urls: Vec<&str> = two.iter().map(|a| a.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "http://mirror.example/mvtec/screw.tar.xz",
                "http://mirror.example/mvtec/bottle.tar.xz"
            ]
        );
        let err = format!("{:#}", archives_for(&["bottel".into()], None).unwrap_err());
        assert!(err.contains("bottel") && err.contains("bottle"), "{err}");
        // Every category has its own official link.
        for (cat, url) in CATEGORY_URLS {
            assert!(url.starts_with("https://www.mydrive.ch/shares/"));
            assert!(url.ends_with(&format!("/{cat}.tar.xz")));
        }
    }

    #[test]
    fn no_network_gives_a_quick_clear_error_with_manual_instructions() {
        // A port that was just free and is now closed: connecting is refused
        // at once, as it is on a machine with no route out. The connect
        // timeout bounds the other offline case (packets dropped).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let opts = DownloadOptions {
            out: dir.path().join("mvtec"),
            categories: vec!["bottle".into()],
            base_url: Some(format!("http://127.0.0.1:{port}")),
            keep_archives: false,
            force: false,
        };
        let err = format!("{:#}", download_mvtec(&opts).unwrap_err());
        assert!(err.contains("cannot reach 127.0.0.1"), "{err}");
        assert!(err.contains("To place the data by hand"), "{err}");
        assert!(
            err.contains("bottle/train/good") || err.contains("<category>/train/good"),
            "{err}"
        );
        assert!(err.contains(MVTEC_PAGE), "{err}");
        assert!(CONNECT_TIMEOUT <= Duration::from_secs(10));
    }

    /// A one-file HTTP/1.1 server on localhost that honours (or ignores)
    /// `Range` and can cut a response short, to test resuming without a
    /// network. Records the Range header of every request.
    fn serve(
        body: Vec<u8>,
        honour_range: bool,
        cut_first_after: Option<usize>,
    ) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let seen = ranges.clone();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let range = handle(
                    stream,
                    &body,
                    honour_range,
                    if i == 0 { cut_first_after } else { None },
                );
                seen.lock().unwrap().push(range);
            }
        });
        (format!("http://{addr}"), ranges)
    }

    fn handle(
        mut stream: TcpStream,
        body: &[u8],
        honour_range: bool,
        cut_after: Option<usize>,
    ) -> Option<String> {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                range = Some(v.trim().to_string());
            }
        }
        let start: usize = match (&range, honour_range) {
            (Some(r), true) => r
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => 0,
        };
        let rest = &body[start.min(body.len())..];
        let head = if start > 0 {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nConnection: close\r\n\r\n",
                rest.len(),
                start,
                body.len() - 1,
                body.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                rest.len()
            )
        };
        let _ = stream.write_all(head.as_bytes());
        let n = cut_after.unwrap_or(rest.len()).min(rest.len());
        let _ = stream.write_all(&rest[..n]);
        let _ = stream.flush();
        range
    }

    fn body() -> Vec<u8> {
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    fn archive(url: &str, body: &[u8], with_checksum: bool) -> Archive {
        Archive {
            name: "bottle.tar.xz".into(),
            url: format!("{url}/bottle.tar.xz"),
            size: Some(body.len() as u64),
            sha256: with_checksum.then(|| hex(&Sha256::digest(body))),
            categories: vec!["bottle".into()],
        }
    }

    #[test]
    fn a_broken_download_resumes_from_the_part_file() {
        let body = body();
        let (url, ranges) = serve(body.clone(), true, Some(70_000));
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("bottle.tar.xz");
        let a = archive(&url, &body, true);
        // The first attempt breaks off after 70 000 bytes and keeps them.
        let err = format!("{:#}", fetch(&agent(), &a, &dest).unwrap_err());
        assert!(err.contains("resume"), "{err}");
        assert_eq!(fs::metadata(part_path(&dest)).unwrap().len(), 70_000);
        // The second asks only for the rest.
        fetch(&agent(), &a, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        assert_eq!(
            *ranges.lock().unwrap(),
            vec![None, Some("bytes=70000-".to_string())]
        );
    }

    #[test]
    fn a_server_that_ignores_range_restarts_cleanly() {
        let body = body();
        let (url, _) = serve(body.clone(), false, None);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("bottle.tar.xz");
        fs::write(part_path(&dest), &body[..1000]).unwrap();
        fetch(&agent(), &archive(&url, &body, true), &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), body);
    }

    #[test]
    fn a_wrong_checksum_or_size_is_an_error_naming_the_file() {
        let body = body();
        let (url, _) = serve(body.clone(), true, None);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("bottle.tar.xz");
        let mut a = archive(&url, &body, true);
        a.sha256 = Some("00".repeat(32));
        let err = format!("{:#}", fetch(&agent(), &a, &dest).unwrap_err());
        assert!(
            err.contains("SHA-256") && err.contains("bottle.tar.xz.part"),
            "{err}"
        );
        assert!(!dest.exists() && !part_path(&dest).exists());

        let mut a = archive(&url, &body, false);
        a.size = Some(123);
        let err = format!("{:#}", fetch(&agent(), &a, &dest).unwrap_err());
        assert!(err.contains("123"), "{err}");
    }

    #[test]
    fn extraction_checks_the_mvtec_layout() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for sub in [
            "bottle/train/good",
            "bottle/test/good",
            "bottle/test/broken_large",
            "bottle/ground_truth/broken_large",
        ] {
            fs::create_dir_all(src.join(sub)).unwrap();
        }
        fs::write(src.join("bottle/train/good/000.png"), b"png").unwrap();
        let tarball = dir.path().join("bottle.tar.xz");
        let ok = Command::new("tar")
            .arg("-cJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src)
            .arg("bottle")
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar -cJf failed");
        let out = dir.path().join("mvtec");
        fs::create_dir_all(&out).unwrap();
        extract(&tarball, &out, &["bottle".into()]).unwrap();
        assert!(out.join("bottle/train/good/000.png").exists());
        assert!(category_done(&out, "bottle"));
        // An archive without the expected category is reported as such.
        let err = format!(
            "{:#}",
            extract(&tarball, &out, &["cable".into()]).unwrap_err()
        );
        assert!(
            err.contains("cable") && err.contains("MVTec AD layout"),
            "{err}"
        );
    }
}
