//! The batch loader: shapes, order, seeded shuffling, cache, masks, augmentation, prefetch shutdown.

use std::collections::HashSet;
use std::path::Path;

use ff_data::synth::{generate_category, SynthConfig};
use ff_data::{mvtec_category, AugmentConfig, Label, Loader, LoaderConfig, Preprocess, Split};

fn synth_split(root: &Path, n_train: usize) -> Split {
    let cfg = SynthConfig {
        image_size: 48,
        n_train,
        n_test_good: 3,
        n_test_defect: 5,
        seed: 3,
    };
    generate_category(root, "tiles", &cfg).unwrap();
    mvtec_category(root, "tiles").unwrap()
}

#[test]
fn batches_have_documented_shapes_and_match_single_image_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 7);
    let pre = Preprocess::imagenet(32);
    let loader = Loader::new(split.train.clone(), pre.clone(), LoaderConfig::new(3));
    assert_eq!(loader.num_batches(), 3);
    let batches: Vec<_> = loader.epoch(0).collect::<Result<_, _>>().unwrap();
    assert_eq!(batches.iter().map(|b| b.n).collect::<Vec<_>>(), [3, 3, 1]);
    let b = &batches[1];
    assert_eq!(
        (b.size, b.images.len(), b.masks.as_ref()),
        (32, 3 * 3 * 32 * 32, None)
    );
    assert_eq!(b.paths[0], split.train[3].path);
    let single = pre.load_image(&split.train[4].path).unwrap();
    assert_eq!((single.channels, single.height, single.width), (3, 32, 32));
    assert_eq!(
        &b.images[3 * 32 * 32..2 * 3 * 32 * 32],
        single.data.as_slice()
    );

    let mut cfg = LoaderConfig::new(3);
    cfg.drop_last = true;
    cfg.shuffle_seed = Some(9);
    let loader = Loader::new(split.train.clone(), pre, cfg);
    assert_eq!(loader.num_batches(), 2);
    assert_eq!(loader.epoch(0).count(), 2);
    // batch_indices names the samples of exactly the batches epoch() yields.
    for epoch in 0..3 {
        let indices = loader.batch_indices(epoch);
        assert_eq!(indices.len(), 2);
        let paths: Vec<Vec<_>> = loader.epoch(epoch).map(|b| b.unwrap().paths).collect();
        let named: Vec<Vec<_>> = indices
            .iter()
            .map(|b| b.iter().map(|&i| split.train[i].path.clone()).collect())
            .collect();
        assert_eq!(paths, named, "epoch {epoch}");
    }
}

#[test]
fn shuffling_is_seeded_per_epoch_and_a_permutation() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 12);
    let mut cfg = LoaderConfig::new(5);
    cfg.shuffle_seed = Some(42);
    let loader = Loader::new(split.train.clone(), Preprocess::imagenet(16), cfg.clone());
    let order = |l: &Loader, e| {
        l.epoch(e)
            .flat_map(|b| b.unwrap().paths)
            .collect::<Vec<_>>()
    };
    let (e0, e1) = (order(&loader, 0), order(&loader, 1));
    assert_eq!(e0.iter().collect::<HashSet<_>>().len(), 12);
    assert_ne!(e0, e1, "each epoch has its own order");
    let again = Loader::new(split.train.clone(), Preprocess::imagenet(16), cfg.clone());
    assert_eq!(order(&again, 1), e1, "same (seed, epoch), same order");
    assert_eq!(loader.epoch_order(1), again.epoch_order(1));
    cfg.shuffle_seed = Some(43);
    let other = Loader::new(split.train.clone(), Preprocess::imagenet(16), cfg);
    assert_ne!(order(&other, 0), e0);
    let plain = Loader::new(
        split.train.clone(),
        Preprocess::imagenet(16),
        LoaderConfig::new(5),
    );
    assert_eq!(
        order(&plain, 3),
        split
            .train
            .iter()
            .map(|s| s.path.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn cache_serves_later_epochs_without_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 4);
    let mut cfg = LoaderConfig::new(2);
    cfg.cache = true;
    let loader = Loader::new(split.train.clone(), Preprocess::imagenet(24), cfg);
    let first: Vec<_> = loader.epoch(0).collect::<Result<_, _>>().unwrap();
    // With every image cached, deleting the files cannot matter any more.
    std::fs::remove_dir_all(dir.path().join("tiles/train")).unwrap();
    let second: Vec<_> = loader.epoch(1).collect::<Result<_, _>>().unwrap();
    assert_eq!(first, second);
    // Without a cache the same deletion is an error naming the file.
    let uncached = Loader::new(split.train, Preprocess::imagenet(24), LoaderConfig::new(2));
    let err = uncached.epoch(0).next().unwrap().unwrap_err();
    assert!(err.to_string().contains("000.png"), "{err}");
}

#[test]
fn masks_are_loaded_for_defects_and_false_for_normals() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 2);
    let pre = Preprocess::imagenet(32);
    let mut cfg = LoaderConfig::new(16);
    cfg.with_masks = true;
    let loader = Loader::new(split.test.clone(), pre.clone(), cfg);
    let b = loader.epoch(0).next().unwrap().unwrap();
    let masks = b.masks.as_ref().unwrap();
    assert_eq!(masks.len(), b.n * 32 * 32);
    for (k, s) in split.test.iter().enumerate() {
        let m = &masks[k * 32 * 32..(k + 1) * 32 * 32];
        assert_eq!(b.labels[k], s.label);
        match &s.mask {
            None => assert!(m.iter().all(|&v| !v), "{:?}", s.path),
            Some(p) => {
                assert_eq!(m, pre.load_mask(p).unwrap().as_slice());
                assert!(m.iter().any(|&v| v), "{:?}: empty mask", s.path);
            }
        }
    }
    assert!(b.labels.contains(&Label::Anomalous) && b.labels.contains(&Label::Normal));
}

#[test]
fn augmentation_is_seeded_and_moves_image_and_mask_together() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 2);
    let defects: Vec<_> = split
        .test
        .into_iter()
        .filter(|s| s.label == Label::Anomalous)
        .collect();
    let s = 32;
    let pre = Preprocess::imagenet(s);
    let mut cfg = LoaderConfig::new(8);
    cfg.with_masks = true;
    let plain = Loader::new(defects.clone(), pre.clone(), cfg.clone())
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    cfg.augment = Some(AugmentConfig {
        color_jitter: 0.0,
        ..AugmentConfig::standard(5)
    });
    let aug = Loader::new(defects.clone(), pre.clone(), cfg.clone());
    let a0 = aug.epoch(0).next().unwrap().unwrap();
    assert_eq!(
        a0,
        aug.epoch(0).next().unwrap().unwrap(),
        "same seed and epoch, same draw"
    );
    assert_ne!(
        a0.images,
        aug.epoch(1).next().unwrap().unwrap().images,
        "new epoch, new draw"
    );
    assert_ne!(a0.images, plain.images, "something was transformed");
    // Without colour jitter the transform is a pixel permutation; the mask
    // must follow it: find, per image, the one of the 16 flip/rotation
    // combinations that maps the plain image to the augmented one, then
    // check the mask under that same mapping.
    let (pm, am) = (plain.masks.unwrap(), a0.masks.unwrap());
    for k in 0..a0.n {
        let img = |v: &[f32], y: usize, x: usize| v[k * 3 * s * s + y * s + x];
        let mut found = false;
        for t in 0..8usize {
            let map = |y: usize, x: usize| {
                let (y, x) = if t & 4 != 0 { (x, y) } else { (y, x) };
                let y = if t & 2 != 0 { s - 1 - y } else { y };
                let x = if t & 1 != 0 { s - 1 - x } else { x };
                (y, x)
            };
            let same_img = (0..s).all(|y| {
                (0..s).all(|x| {
                    let (sy, sx) = map(y, x);
                    img(&a0.images, y, x) == img(&plain.images, sy, sx)
                })
            });
            if same_img {
                found = true;
                let same_mask = (0..s).all(|y| {
                    (0..s).all(|x| {
                        let (sy, sx) = map(y, x);
                        am[k * s * s + y * s + x] == pm[k * s * s + sy * s + sx]
                    })
                });
                assert!(same_mask, "image {k}: mask did not follow the image");
                break;
            }
        }
        assert!(found, "image {k}: not a flip/rotation of the original");
    }
    // Colour jitter changes values but never the mask.
    cfg.augment = Some(AugmentConfig {
        hflip: false,
        vflip: false,
        rot90: false,
        color_jitter: 0.2,
        seed: 1,
    });
    let jit = Loader::new(defects, pre, cfg)
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(jit.masks.unwrap(), pm);
    assert_ne!(jit.images, plain.images);
}

#[test]
fn dropping_an_epoch_early_stops_the_prefetch_thread() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 10);
    let loader = Loader::new(split.train, Preprocess::imagenet(16), LoaderConfig::new(1));
    for e in 0..20 {
        let mut it = loader.epoch(e);
        assert!(it.next().unwrap().is_ok());
        // `it` is dropped here with batches still pending; Drop joins the worker.
    }
    assert_eq!(loader.epoch(0).count(), 10);
}

#[test]
fn loading_chosen_samples_matches_the_epochs_batches() {
    let dir = tempfile::tempdir().unwrap();
    let split = synth_split(dir.path(), 7);
    let mut cfg = LoaderConfig::new(4);
    cfg.shuffle_seed = Some(11);
    cfg.augment = Some(AugmentConfig::standard(2));
    let loader = Loader::new(split.train, Preprocess::imagenet(16), cfg);
    let epoch = 3;
    let order = loader.batch_indices(epoch);
    let batch = loader.epoch(epoch).next().unwrap().unwrap();
    // The whole first batch, and a subset of it in another order: sample by
    // sample the same values as the epoch's batch (augmentation included).
    let whole = loader.load(&order[0], epoch).unwrap();
    assert_eq!(whole, batch);
    let picked = [order[0][2], order[0][0]];
    let part = loader.load(&picked, epoch).unwrap();
    let per_image = 3 * 16 * 16;
    assert_eq!(part.n, 2);
    assert_eq!(
        part.images[..per_image],
        batch.images[2 * per_image..3 * per_image]
    );
    assert_eq!(part.images[per_image..], batch.images[..per_image]);
    assert_eq!(part.paths, [batch.paths[2].clone(), batch.paths[0].clone()]);
}
