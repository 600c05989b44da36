//! With the `cuda` feature, compiles `src/cuda/coupling.cu` to PTX with
//! nvcc (from `CUDA_HOME/bin` or `PATH`) for compute capability
//! `CUDA_COMPUTE_CAP` (default 80; the driver JIT-compiles PTX for newer
//! GPUs). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/cuda/coupling.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("coupling.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/cuda/coupling.cu")
        .status()
        .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ('{}'): {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on src/cuda/coupling.cu");
}
