//! Helpers shared by the `fastflow` end-to-end tests: running the binary
//! offline, reading what it wrote, and asserting on its exit.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Output};

/// Command-line arguments of mixed types (`&str`, paths) as `OsString`s.
#[macro_export]
macro_rules! args {
    ($($x:expr),* $(,)?) => {
        vec![$(std::ffi::OsString::from(AsRef::<std::ffi::OsStr>::as_ref(&$x))),*]
    };
}

/// Runs the built `fastflow` binary with `args`, offline.
pub fn fastflow(args: Vec<OsString>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fastflow"));
    cmd.args(&args);
    // Tests never touch the network, and an empty hub cache makes the hub
    // unavailable even on machines that have the ResNet18 weights cached.
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd.env(
        "HF_HOME",
        std::env::temp_dir().join("fastflow-cli-tests-empty-hf-home"),
    );
    cmd.output().expect("cannot start the fastflow binary")
}

/// The exit status and both output streams, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "fastflow failed:\n{}", text(out));
}

/// A JSON file the binary wrote; panics naming the file if it is unreadable.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
