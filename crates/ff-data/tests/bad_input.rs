//! Listing MVTec AD and folder datasets, and every kind of bad input: one clear error (or a documented skip), never a panic.

use std::path::Path;

use ff_data::{
    folder_dataset, mvtec_category, Error, FolderConfig, Label, Loader, LoaderConfig, Preprocess,
};
use image::{GrayImage, RgbImage};

fn png(path: &Path, w: u32, h: u32, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v]))
        .save(path)
        .unwrap();
}

fn mask(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]))
        .save(path)
        .unwrap();
}

/// A tiny MVTec-layout category: 3 train, 2 good + 2 "crack" + 1 "hole" test.
fn mvtec(root: &Path) -> std::path::PathBuf {
    let c = root.join("widget");
    for i in 0..3 {
        png(
            &c.join(format!("train/good/{i:03}.png")),
            20,
            20,
            10 * i as u8,
        );
    }
    for i in 0..2 {
        png(&c.join(format!("test/good/{i:03}.png")), 20, 20, 100);
        png(&c.join(format!("test/crack/{i:03}.png")), 20, 20, 200);
        mask(
            &c.join(format!("ground_truth/crack/{i:03}_mask.png")),
            20,
            20,
        );
    }
    png(&c.join("test/hole/000.png"), 20, 20, 50);
    mask(&c.join("ground_truth/hole/000_mask.png"), 20, 20);
    c
}

/// Records log messages so tests can check that skipped files are reported.
struct Recorder(std::sync::Mutex<Vec<String>>);

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        if record.level() == log::Level::Warn {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }
    fn flush(&self) {}
}

static RECORDER: Recorder = Recorder(std::sync::Mutex::new(Vec::new()));

fn warnings_about(needle: &str) -> usize {
    // Tests share the process-wide logger; the first call installs it.
    let _ = log::set_logger(&RECORDER);
    log::set_max_level(log::LevelFilter::Warn);
    RECORDER
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains(needle))
        .count()
}

fn all_batches(loader: &Loader) -> Result<Vec<ff_data::Batch>, Error> {
    loader.epoch(0).collect()
}

#[test]
fn mvtec_listing_is_sorted_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    let split = mvtec_category(dir.path(), "widget").unwrap();
    assert_eq!(split.train.len(), 3);
    assert!(split.train.windows(2).all(|w| w[0].path < w[1].path));
    assert!(split
        .train
        .iter()
        .all(|s| s.label == Label::Normal && s.mask.is_none()));
    let defects: Vec<&str> = split.test.iter().map(|s| s.defect.as_str()).collect();
    assert_eq!(defects, ["crack", "crack", "good", "good", "hole"]);
    let crack = &split.test[1];
    assert_eq!(crack.label, Label::Anomalous);
    assert_eq!(crack.path, c.join("test/crack/001.png"));
    assert_eq!(
        crack.mask.as_deref(),
        Some(c.join("ground_truth/crack/001_mask.png").as_path())
    );
    assert_eq!(split.test[2].label, Label::Normal);
    assert!(split.has_masks());
}

#[test]
fn mvtec_category_list_has_the_fifteen() {
    assert_eq!(ff_data::MVTEC_CATEGORIES.len(), 15);
    assert!(ff_data::MVTEC_CATEGORIES.contains(&"metal_nut"));
}

#[test]
fn missing_category_dir_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = mvtec_category(dir.path(), "bottle").unwrap_err();
    assert!(
        matches!(&err, Error::MissingDir { path } if path.ends_with("bottle")),
        "{err}"
    );
    assert!(err.to_string().contains("bottle"));
}

#[test]
fn empty_train_set_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    for e in std::fs::read_dir(c.join("train/good")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    // A non-image file alone does not make a training set either.
    std::fs::write(c.join("train/good/notes.txt"), "hello").unwrap();
    let err = mvtec_category(dir.path(), "widget").unwrap_err();
    assert!(
        matches!(&err, Error::EmptyTrainSet { path } if path.ends_with("train/good")),
        "{err}"
    );
}

#[test]
fn defect_image_without_mask_names_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    std::fs::remove_file(c.join("ground_truth/hole/000_mask.png")).unwrap();
    let err = mvtec_category(dir.path(), "widget").unwrap_err();
    match &err {
        Error::MissingMask { image, expected } => {
            assert!(image.ends_with("test/hole/000.png"));
            assert!(expected.ends_with("ground_truth/hole/000_mask.png"));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn non_image_files_and_subdirs_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    std::fs::write(c.join("train/good/.DS_Store"), [0u8; 4]).unwrap();
    std::fs::write(c.join("train/good/README.md"), "notes").unwrap();
    std::fs::create_dir_all(c.join("train/good/thumbs")).unwrap();
    std::fs::write(c.join("test/license.txt"), "x").unwrap();
    std::fs::write(c.join("test/crack/._000.png"), [0u8; 8]).unwrap();
    std::fs::create_dir_all(c.join("test/.ipynb_checkpoints")).unwrap();
    warnings_about("");
    let split = mvtec_category(dir.path(), "widget").unwrap();
    assert_eq!(split.train.len(), 3);
    assert_eq!(split.test.len(), 5);
    for skipped in [
        ".DS_Store",
        "README.md",
        "thumbs",
        "license.txt",
        "._000.png",
        ".ipynb_checkpoints",
    ] {
        let p = dir.path().display().to_string();
        let n = RECORDER
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.contains(&p) && m.contains(skipped))
            .count();
        assert_eq!(n, 1, "one warning for {skipped}");
    }
}

#[test]
fn unreadable_and_truncated_images_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    let pre = Preprocess::imagenet(16);
    // Truncated: the first half of a real PNG.
    let good = std::fs::read(c.join("train/good/001.png")).unwrap();
    let truncated = c.join("train/good/001.png");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let err = pre.load_image(&truncated).unwrap_err();
    assert!(
        matches!(&err, Error::Decode { path, .. } if path == &truncated),
        "{err}"
    );
    // Garbage with an image extension.
    let garbage = c.join("train/good/002.png");
    std::fs::write(&garbage, b"this is not a png").unwrap();
    let err = pre.load_image(&garbage).unwrap_err();
    assert!(err.to_string().contains("002.png"), "{err}");
    // Missing file.
    let err = pre.load_image(&c.join("nope.png")).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("nope.png")),
        "{err}"
    );
    // Through the loader: the error arrives as a batch item and ends the epoch.
    let split = mvtec_category(dir.path(), "widget").unwrap();
    let loader = Loader::new(split.train, pre, LoaderConfig::new(1));
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 2, "one good batch, then the error");
    assert!(items[0].is_ok());
    let err = items[1].as_ref().unwrap_err();
    assert!(err.to_string().contains("001.png"), "{err}");
}

#[test]
fn mask_size_mismatch_names_mask_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let c = mvtec(dir.path());
    mask(&c.join("ground_truth/hole/000_mask.png"), 24, 20);
    let split = mvtec_category(dir.path(), "widget").unwrap();
    let mut cfg = LoaderConfig::new(8);
    cfg.with_masks = true;
    let loader = Loader::new(split.test, Preprocess::imagenet(16), cfg);
    let err = all_batches(&loader).unwrap_err();
    match &err {
        Error::MaskSizeMismatch {
            mask,
            image,
            mask_width,
            image_width,
            ..
        } => {
            assert!(mask.ends_with("000_mask.png") && image.ends_with("hole/000.png"));
            assert_eq!((*mask_width, *image_width), (24, 20));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn masks_requested_without_recorded_mask_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let normal = dir.path().join("good");
    let bad = dir.path().join("bad");
    for i in 0..4 {
        png(&normal.join(format!("{i}.png")), 12, 10, 30);
    }
    png(&bad.join("b.png"), 12, 10, 200);
    let split = folder_dataset(&FolderConfig::new(&normal, &bad)).unwrap();
    assert!(!split.has_masks());
    let mut cfg = LoaderConfig::new(4);
    cfg.with_masks = true;
    let err = all_batches(&Loader::new(split.test, Preprocess::imagenet(8), cfg)).unwrap_err();
    assert!(
        matches!(&err, Error::NoMaskRecorded { image } if image.ends_with("b.png")),
        "{err}"
    );
}

#[test]
fn folder_dataset_follows_anomalib_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (normal, bad, masks, ntest) = (
        dir.path().join("ok"),
        dir.path().join("scratched"),
        dir.path().join("gt"),
        dir.path().join("ok_test"),
    );
    for i in 0..10 {
        png(&normal.join(format!("n{i:02}.jpg")), 30, 20, 10);
    }
    std::fs::write(normal.join("Thumbs.db"), [1u8, 2]).unwrap();
    for i in 0..3 {
        png(&bad.join(format!("b{i}.PNG")), 30, 20, 200);
    }
    mask(&masks.join("b0.png"), 30, 20);
    mask(&masks.join("b1_mask.png"), 30, 20);
    mask(&masks.join("b2.bmp"), 30, 20);

    // Without a normal test dir: a seeded 20 % of the normals is held out.
    let mut cfg = FolderConfig::new(&normal, &bad);
    cfg.mask_dir = Some(masks.clone());
    let split = folder_dataset(&cfg).unwrap();
    assert_eq!(split.train.len(), 8);
    assert_eq!(
        split
            .test
            .iter()
            .filter(|s| s.label == Label::Normal)
            .count(),
        2
    );
    let abn: Vec<_> = split
        .test
        .iter()
        .filter(|s| s.label == Label::Anomalous)
        .collect();
    assert_eq!(abn.len(), 3);
    assert!(abn.iter().all(|s| s.defect == "scratched"));
    assert!(abn[1].mask.as_ref().unwrap().ends_with("b1_mask.png"));
    assert!(abn[2].mask.as_ref().unwrap().ends_with("b2.bmp"));
    assert!(split.has_masks());
    assert_eq!(folder_dataset(&cfg).unwrap(), split, "deterministic");
    let mut other_seed = cfg.clone();
    other_seed.seed = 7;
    let held = |s: &ff_data::Split| {
        s.test
            .iter()
            .filter(|x| x.label == Label::Normal)
            .map(|x| x.path.clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(
        held(&folder_dataset(&other_seed).unwrap()),
        held(&split),
        "seed chooses the held-out normals"
    );

    // With a normal test dir, all normals train.
    for i in 0..2 {
        png(&ntest.join(format!("t{i}.png")), 30, 20, 10);
    }
    cfg.normal_test_dir = Some(ntest);
    let split = folder_dataset(&cfg).unwrap();
    assert_eq!(split.train.len(), 10);
    assert_eq!(split.test.len(), 5);

    // An abnormal image without its mask.
    std::fs::remove_file(masks.join("b2.bmp")).unwrap();
    let err = folder_dataset(&cfg).unwrap_err();
    assert!(
        matches!(&err, Error::MissingMask { image, .. } if image.ends_with("b2.PNG")),
        "{err}"
    );

    // Missing and bad settings.
    let err = folder_dataset(&FolderConfig::new(dir.path().join("absent"), &bad)).unwrap_err();
    assert!(
        matches!(&err, Error::MissingDir { path } if path.ends_with("absent")),
        "{err}"
    );
    let mut bad_ratio = FolderConfig::new(&normal, &bad);
    bad_ratio.normal_split_ratio = 1.0;
    assert!(matches!(folder_dataset(&bad_ratio), Err(Error::Config(_))));
}

#[test]
fn zero_sizes_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    mvtec(dir.path());
    let split = mvtec_category(dir.path(), "widget").unwrap();
    let loader = Loader::new(split.train, Preprocess::imagenet(8), LoaderConfig::new(0));
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 1);
    assert!(matches!(items[0], Err(Error::Config(_))));
    let loader = Loader::new(vec![], Preprocess::imagenet(0), LoaderConfig::new(4));
    assert!(matches!(
        loader.epoch(0).next(),
        Some(Err(Error::Config(_)))
    ));
    let err = Preprocess::imagenet(0)
        .load_image(Path::new("x.png"))
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    // In memory: an empty image or a zero size gives an empty or black tensor, not a panic.
    let t = Preprocess::imagenet(4).preprocess_rgb(&RgbImage::new(0, 0));
    assert_eq!((t.height, t.width, t.data.len()), (4, 4, 48));
    assert!(Preprocess::imagenet(0)
        .preprocess_rgb(&RgbImage::new(5, 3))
        .data
        .is_empty());
}
