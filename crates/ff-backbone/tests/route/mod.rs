//! Which route a parity test run checks, shared by the parity tests of
//! ff-backbone and ff-flow (ff-flow includes this file by path).
//!
//! - the CPU kernels: a plain `cargo test`;
//! - candle's device-generic operations on the CPU: `FASTFLOW_KERNELS=generic`;
//! - CUDA: tests built with `--features cuda` run on CUDA device 0 when one
//!   is present (`data-scripts/gpu_check.sh`); without a device, or without
//!   the feature, they run on the CPU and [`route_note`] says why CUDA was
//!   skipped. `FASTFLOW_TEST_DEVICE=cpu` keeps a CUDA build on the CPU.
//!
//! The tolerances are the same on every route. CUDA runs with TF32 off
//! (candle's default), so float32 matmuls and convolutions stay float32.
#![allow(dead_code)]

use std::sync::OnceLock;

use candle_core::Device;

/// The device of this run's route, with the reason CUDA is not it, if not.
fn route() -> &'static (Device, Option<String>) {
    static ROUTE: OnceLock<(Device, Option<String>)> = OnceLock::new();
    ROUTE.get_or_init(|| {
        if std::env::var("FASTFLOW_TEST_DEVICE").as_deref() == Ok("cpu") {
            return (Device::Cpu, Some("FASTFLOW_TEST_DEVICE=cpu".into()));
        }
        if !cfg!(feature = "cuda") {
            return (Device::Cpu, Some("built without --features cuda".into()));
        }
        match Device::new_cuda(0) {
            Ok(dev) => (dev, None),
            Err(e) => (Device::Cpu, Some(format!("no CUDA device ({e})"))),
        }
    })
}

/// The device every tensor of a parity test lives on.
pub fn dev() -> Device {
    route().0.clone()
}

/// One line naming the route this run checks.
pub fn route_note() -> String {
    let kernels = match std::env::var("FASTFLOW_KERNELS").as_deref() {
        Ok("generic") => "candle's generic operations",
        _ => "the CPU kernels",
    };
    match &route().1 {
        None => "route: CUDA (device 0)".to_string(),
        Some(why) => format!("route: {kernels} on the CPU; CUDA route skipped: {why}"),
    }
}
