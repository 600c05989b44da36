//! The hub weight source when the hub cannot be reached: a clear error naming
//! the repository and the endpoint within seconds, never a hang.
//!
//! This file is its own test binary and holds one test, because it changes
//! process-wide environment variables that other tests must not see. It opens
//! no connection beyond loopback and a non-routable address.

use std::time::{Duration, Instant};

use candle_core::Device;
use ff_backbone::{Backbone, BackboneKind, Error, WeightSource};

#[test]
fn unreachable_hub_fails_fast_naming_the_repo() {
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
    let kind = BackboneKind::WideResNet50_2;
    let source = WeightSource::hub(kind);

    // A closed loopback port (refused at once) and a non-routable address
    // (dropped: only the connect timeout ends the wait).
    for endpoint in ["http://127.0.0.1:9", "https://10.255.255.1"] {
        std::env::set_var("HF_ENDPOINT", endpoint);
        let start = Instant::now();
        let err = Backbone::load(kind, &source, &Device::Cpu).expect_err("no hub: must fail");
        // A hang guard, not a speed test: the connect timeout is 3 s, so 30 s
        // can only be exceeded by a wait that the timeout failed to bound.
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(30), "{endpoint}: {elapsed:?}");
        match &err {
            Error::Hub { repo, message } => {
                assert_eq!(repo, "timm/wide_resnet50_2.racm_in1k");
                assert!(message.contains(endpoint), "{message}");
            }
            other => panic!("{endpoint}: expected a hub error, got {other:?}"),
        }
    }
}
