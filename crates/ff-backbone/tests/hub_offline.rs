//! The hub weight source with `HF_HUB_OFFLINE=1`: answered from the cache
//! only, with a clear error naming the repository when the file is not there.
//!
//! This file is its own test binary and holds one test, because it changes
//! process-wide environment variables that other tests must not see.

mod common;

use std::time::{Duration, Instant};

use candle_core::Device;
use common::{det_tensors, write_safetensors};
use ff_backbone::{Backbone, BackboneKind, Error, WeightSource};

#[test]
fn offline_hub_uses_the_cache_and_names_the_repo_when_absent() {
    let home = tempfile::tempdir().expect("tempdir");
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");
    // An endpoint that would refuse at once, should offline mode leak a request.
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");

    let kind = BackboneKind::ResNet18;
    let source = WeightSource::hub(kind);

    // 1. Empty cache: a hub error naming the repository, without network.
    let start = Instant::now();
    let err = Backbone::load(kind, &source, &Device::Cpu).expect_err("empty cache must fail");
    // A hang guard, not a speed test: nothing here may wait on the network.
    assert!(start.elapsed() < Duration::from_secs(30));
    match &err {
        Error::Hub { repo, message } => {
            assert_eq!(repo, "timm/resnet18.tv_in1k");
            assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
        }
        other => panic!("expected a hub error, got {other:?}"),
    }
    assert!(err.to_string().contains("timm/resnet18.tv_in1k"));

    // 2. The file in the cache, laid out as hf-hub stores it: it loads offline.
    let repo_dir = home
        .path()
        .join("hub")
        .join("models--timm--resnet18.tv_in1k");
    let snapshot = repo_dir.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).expect("mkdir snapshot");
    std::fs::create_dir_all(repo_dir.join("refs")).expect("mkdir refs");
    std::fs::write(repo_dir.join("refs").join("main"), "0123abcd").expect("write ref");
    write_safetensors(&det_tensors(kind), &snapshot.join("model.safetensors"));
    let backbone = Backbone::load(kind, &source, &Device::Cpu).expect("load from the cache");
    assert_eq!(backbone.kind(), kind);

    // 3. Another repository is still absent and named in the error.
    let other = WeightSource::Hub {
        repo: "timm/wide_resnet50_2.racm_in1k".into(),
    };
    match Backbone::load(BackboneKind::WideResNet50_2, &other, &Device::Cpu) {
        Err(Error::Hub { repo, .. }) => assert_eq!(repo, "timm/wide_resnet50_2.racm_in1k"),
        other => panic!("expected a hub error, got {other:?}"),
    }
}
