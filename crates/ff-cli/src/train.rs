//! `fastflow train`: the reference's training loop (Adam over norms and
//! flows, seeded data order, evaluation and checkpoint every N epochs, a final
//! evaluation), with exact resume from a checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ff_backbone::WeightSource;
use ff_data::{AugmentConfig, Loader, LoaderConfig, Preprocess};
use ff_flow::{Adam, AdamConfig, FastFlowConfig};
use serde::Serialize;

use crate::checkpoint::{
    read_meta, write_checkpoint, CheckpointBytes, CheckpointMeta, CheckpointPaths, OptimizerMeta,
    RunDir, TrainMeta, FORMAT,
};
use crate::cli::{DataArgs, FeatureCacheArg, TrainArgs};
use crate::config::load_model_config;
use crate::data::{images_tensor, load_split};
use crate::engine::{describe_config, device, load_backbone, parse_weights, Engine, NonFinite};
use crate::evaluate::{evaluate_cached, test_loader, DecodedImages, Evaluation};
use crate::feature_cache::{self, FeatureStore, Placement};
use crate::fsutil::{append_json_line, ensure_writable_dir, write_atomic, write_json_atomic};
use crate::progress::{EpochProgress, EpochSummary};
use crate::report::{markdown_report, metrics_table, Metrics, ReportContext};

/// Everything a training run needs, resolved from flags, a config file, a
/// checkpoint to resume, or the demo.
#[derive(Debug, Clone)]
pub struct TrainPlan {
    pub cfg: FastFlowConfig,
    pub data: DataArgs,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub eval_every: usize,
    pub seed: u64,
    pub weights: WeightSource,
    pub run_dir: PathBuf,
    pub resume: Option<CheckpointPaths>,
    pub json: Option<PathBuf>,
    pub device: candle_core::Device,
    /// Where the backbone features are kept between epochs.
    pub feature_cache: FeatureCacheArg,
    /// Memory budget of the feature cache in MiB (default: half of what is available).
    pub feature_cache_mb: Option<u64>,
    /// Augment training images (flips, 90-degree turns, a little colour jitter).
    pub augment: bool,
}

/// What a finished run leaves behind.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run: RunDir,
    pub evaluation: Evaluation,
    pub train_seconds: f64,
}

#[derive(Serialize)]
struct EvalLogLine<'a> {
    epoch: usize,
    optimizer_step: u64,
    #[serde(flatten)]
    metrics: &'a crate::report::Metrics,
    map_range: [f32; 2],
    best: bool,
}

/// What `train --json` writes: the final evaluation's metrics (the keys of
/// `eval --json`), the epochs trained and the training time in seconds.
#[derive(Serialize)]
struct TrainJson<'a> {
    #[serde(flatten)]
    metrics: &'a Metrics,
    epochs: usize,
    train_seconds: f64,
}

/// `fastflow train`.
pub fn run_train(args: TrainArgs) -> Result<()> {
    let device = device(args.run_on.device)?;
    let resume = args
        .resume
        .as_ref()
        .map(|p| CheckpointPaths::from_user_path_or_run(p, "last"));
    let mut cfg = args.config.as_deref().map(load_model_config).transpose()?;
    if let (Some(cfg), Some(n)) = (cfg.as_mut(), args.input_size) {
        cfg.input_size = n;
        cfg.validate().context("invalid --input-size")?;
    }
    // Settings not given on the command line come from the checkpoint when
    // resuming (so that the run continues exactly), else the reference's.
    let (cfg, seed, weights, previous) = match (&resume, cfg) {
        (None, Some(cfg)) => {
            let weights = parse_weights(&args.weights, cfg.backbone_kind()?, args.seed)?;
            (cfg, args.seed, weights, None)
        }
        (None, None) => bail!("--config is required unless --resume is given"),
        (Some(paths), cfg) => {
            let meta = read_meta(paths)?;
            if let Some(n) = args.input_size.filter(|&n| n != meta.config.input_size) {
                bail!(
                    "--input-size {n} differs from the checkpoint's input size {} ('{}')",
                    meta.config.input_size,
                    paths.meta.display()
                );
            }
            if let (Some(cfg), Some(path)) = (cfg, &args.config) {
                if meta.config != cfg {
                    bail!(
                        "config '{}' ({}) does not match the checkpoint '{}' ({})",
                        path.display(),
                        describe_config(&cfg),
                        paths.meta.display(),
                        describe_config(&meta.config)
                    );
                }
            }
            // The seed and the backbone are part of the run: a resumed run keeps
            // the checkpoint's.
            let weights = parse_weights(
                &meta.backbone_weights,
                meta.config.backbone_kind()?,
                meta.seed,
            )?;
            (meta.config.clone(), meta.seed, weights, Some(meta))
        }
    };
    let prev = previous.as_ref();
    let batch_size = args
        .batch_size
        .or(prev.map(|m| m.train.batch_size))
        .unwrap_or(32);
    let lr = args.lr.or(prev.map(|m| m.optimizer.lr)).unwrap_or(1e-3);
    let weight_decay = args
        .weight_decay
        .or(prev.map(|m| m.optimizer.weight_decay))
        .unwrap_or(1e-5);
    let eval_every = args
        .eval_every
        .or(prev.map(|m| m.train.eval_every))
        .unwrap_or(10);
    if let Some(m) = prev {
        if batch_size != m.train.batch_size
            || lr != m.optimizer.lr
            || weight_decay != m.optimizer.weight_decay
        {
            eprintln!(
                "note: batch size, learning rate or weight decay differ from the checkpoint's \
                 ({}, {}, {}); the resumed run will not equal an uninterrupted one",
                m.train.batch_size, m.optimizer.lr, m.optimizer.weight_decay
            );
        }
    }
    let run_dir = match (&args.out, &resume) {
        (Some(out), _) => out.clone(),
        // A resumed run continues in its own directory (`<run>/checkpoints/last.json`).
        (None, Some(paths)) => paths
            .meta
            .parent()
            .and_then(|p| p.parent())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
        (None, None) => {
            let stem = args
                .config
                .as_deref()
                .and_then(|c| c.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            PathBuf::from("runs").join(format!("{stem}-{}", args.data.category))
        }
    };
    let plan = TrainPlan {
        cfg,
        data: args.data,
        epochs: args.epochs,
        batch_size,
        lr,
        weight_decay,
        eval_every,
        seed,
        weights,
        run_dir,
        resume,
        json: args.report.json,
        device,
        feature_cache: args.feature_cache,
        feature_cache_mb: args.feature_cache_mb,
        // A resumed run keeps augmenting if it did.
        augment: args.augment || prev.is_some_and(|m| m.train.augment),
    };
    let outcome = train(&plan)?;
    println!("{}", metrics_table(&outcome.evaluation.metrics));
    println!("run directory: {}", outcome.run.root.display());
    println!("checkpoints:   {}", outcome.run.checkpoints().display());
    println!("report:        {}", outcome.run.report().display());
    if let Some(json) = &plan.json {
        println!("metrics:       {}", json.display());
    }
    Ok(())
}

/// Trains per `plan`; see the module doc.
pub fn train(plan: &TrainPlan) -> Result<TrainOutcome> {
    let mut session = Session::open(plan)?;
    let mut last_eval: Option<(usize, Evaluation)> = None;
    for epoch in session.start_epoch..plan.epochs {
        let summary = session.train_epoch(epoch)?;
        append_json_line(&session.run.train_log(), &summary)?;
        let done = epoch + 1;
        if done % plan.eval_every == 0 || done == plan.epochs {
            last_eval = Some((done, session.evaluate_and_save(done)?));
        }
    }
    session.finish(last_eval)
}

/// One training run in progress: what [`train`] sets up once and each epoch,
/// evaluation and the final report work on.
struct Session<'a> {
    plan: &'a TrainPlan,
    run: RunDir,
    loader: Loader,
    /// Test images, decoded once and kept for every evaluation of the run.
    test: Loader,
    engine: Engine,
    adam: Adam,
    adam_cfg: AdamConfig,
    caches: Option<Caches>,
    start_epoch: usize,
    best_score: Option<[f64; 2]>,
    /// Training seconds of the run's earlier parts (before a resume).
    prior_seconds: f64,
    train_meta: TrainMeta,
    /// The newest checkpoint this run can be resumed from, for error messages.
    last_good: LastGood,
    start: Instant,
}

impl<'a> Session<'a> {
    /// Checks the plan and the output, loads the data, builds or restores
    /// the model and its optimizer, and decides the feature cache.
    fn open(plan: &'a TrainPlan) -> Result<Self> {
        anyhow::ensure!(plan.batch_size > 0, "--batch-size must be at least 1");
        anyhow::ensure!(plan.eval_every > 0, "--eval-every must be at least 1");
        anyhow::ensure!(plan.epochs > 0, "--epochs must be at least 1");
        plan.cfg.validate().context("invalid model config")?;
        let kind = plan.cfg.backbone_kind()?;
        let run = RunDir::new(plan.run_dir.clone());
        // An output that cannot be written fails now, not after the first epochs.
        ensure_writable_dir(&run.checkpoints(), "run directory")?;
        if let Some(dir) = plan
            .json
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| !d.as_os_str().is_empty())
        {
            ensure_writable_dir(dir, "folder of --json")?;
        }

        let split = load_split(&plan.data, plan.seed)?;
        anyhow::ensure!(!split.train.is_empty(), "no training images found");
        let n_train = split.train.len();
        let mut loader_cfg = LoaderConfig::new(plan.batch_size);
        loader_cfg.shuffle_seed = Some(plan.seed);
        loader_cfg.cache = true;
        loader_cfg.augment = plan.augment.then(|| AugmentConfig::standard(plan.seed));
        // The reference drops the last incomplete batch; with fewer images
        // than one batch that would leave nothing to train on, so it is kept then.
        loader_cfg.drop_last = n_train >= plan.batch_size;
        let loader = Loader::new(
            split.train.clone(),
            Preprocess::imagenet(plan.cfg.input_size),
            loader_cfg,
        );
        let test = test_loader(
            &split.test,
            plan.cfg.input_size,
            plan.batch_size,
            DecodedImages::Keep,
        );

        let backbone = load_backbone(kind, &plan.weights, &plan.device)?;
        let adam_cfg = AdamConfig {
            lr: plan.lr,
            weight_decay: plan.weight_decay,
            ..AdamConfig::default()
        };
        let (engine, adam, start_epoch, best_score, prior_seconds) = match &plan.resume {
            None => {
                let engine = Engine::new(&plan.cfg, backbone, plan.seed, &plan.device)?;
                let adam = engine.optimizer(adam_cfg)?;
                (engine, adam, 0, None, 0.0)
            }
            Some(paths) => {
                let meta = read_meta(paths)?;
                let engine = Engine::from_checkpoint(&meta, paths, backbone, &plan.device)?;
                let mut adam = engine.optimizer(adam_cfg)?;
                engine.restore_optimizer(&mut adam, paths, meta.optimizer.step)?;
                println!(
                    "resuming from '{}' after epoch {} (optimizer step {})",
                    paths.meta.display(),
                    meta.epoch,
                    meta.optimizer.step
                );
                (
                    engine,
                    adam,
                    meta.epoch,
                    meta.best_score,
                    meta.train_seconds,
                )
            }
        };
        if start_epoch >= plan.epochs {
            println!(
                "the checkpoint has already trained {start_epoch} of {} epochs; evaluating only",
                plan.epochs
            );
        }
        println!(
            "training {} on '{}' ({} images, batch {}, epochs {}..{}), backbone: {}",
            describe_config(&plan.cfg),
            plan.data.category,
            n_train,
            plan.batch_size,
            start_epoch + 1,
            plan.epochs,
            plan.weights.describe()
        );
        let train_meta = TrainMeta {
            data: plan.data.data.clone(),
            category: plan.data.category.clone(),
            format: plan.data.format,
            batch_size: plan.batch_size,
            epochs: plan.epochs,
            eval_every: plan.eval_every,
            augment: plan.augment,
        };
        let caches = feature_caches(plan, &engine, &loader, &run, split.test.len())?;
        Ok(Self {
            plan,
            run,
            loader,
            test,
            engine,
            adam,
            adam_cfg,
            caches,
            start_epoch,
            best_score,
            prior_seconds,
            train_meta,
            last_good: LastGood(plan.resume.as_ref().map(|p| (p.meta.clone(), start_epoch))),
            start: Instant::now(),
        })
    }

    /// Trains one epoch (0-based `epoch`): its batches in the (seed, epoch)
    /// order, features from the cache where it has them.
    fn train_epoch(&mut self, epoch: usize) -> Result<EpochSummary> {
        let plan = self.plan;
        // The data order depends only on (seed, epoch), so a resumed run sees
        // the same batches as an uninterrupted one.
        let batches = self.loader.batch_indices(epoch);
        let n_batches = batches.len();
        let cached = self
            .caches
            .as_ref()
            .is_some_and(|c| batches.iter().all(|b| c.train.has_all(b)));
        let note = (self.caches.is_some() && !cached).then_some("filling the feature cache");
        let mut progress = EpochProgress::start(epoch + 1, plan.epochs, n_batches, note);
        if epoch == self.start_epoch {
            progress = progress.first_of_process();
        }
        // Without a cache every batch's images come from the loader's
        // background thread; with one, only the images whose features are
        // missing are loaded, batch by batch (a cache-filling epoch used to
        // load every image of a batch that lacked any).
        let mut images = (self.caches.is_none()).then(|| self.loader.epoch(epoch));
        for (i, indices) in batches.iter().enumerate() {
            let loaded = match images.as_mut() {
                Some(it) => {
                    let batch = it
                        .next()
                        .context("the loader ended before its last batch")?
                        .context("cannot load a training batch")?;
                    Some(batch)
                }
                None => None,
            };
            let features = match (self.caches.as_mut(), loaded) {
                (Some(c), _) if c.train.has_all(indices) => c.train.load(indices, &plan.device)?,
                // Only the images without features are loaded and go through
                // the backbone; the batch is then read back whole from the
                // cache (features do not depend on which images share a
                // batch).
                (Some(c), _) => {
                    let wait = Instant::now();
                    let ids: Vec<usize> = c
                        .train
                        .missing(indices)
                        .iter()
                        .map(|&k| indices[k])
                        .collect();
                    let batch = self.loader.load(&ids, epoch).with_context(|| {
                        format!(
                            "cannot load a training batch (batch {} of epoch {})",
                            i + 1,
                            epoch + 1
                        )
                    })?;
                    // Loading images is work cached epochs skip, like the backbone.
                    progress.add_once_seconds(wait.elapsed().as_secs_f64());
                    let all: Vec<usize> = (0..ids.len()).collect();
                    let seconds = c
                        .train
                        .fill(&self.engine, &batch, &ids, &all, &plan.device)?;
                    progress.add_once_seconds(seconds);
                    c.train.load(indices, &plan.device)?
                }
                (None, Some(batch)) => self
                    .engine
                    .features(&images_tensor(&batch, &plan.device)?)?,
                (None, None) => bail!(
                    "batch {} of epoch {} has neither cached features nor images",
                    i + 1,
                    epoch + 1
                ),
            };
            let step = self.adam.step_count() + 1;
            let loss = self.engine.train_step_features(&mut self.adam, features)?;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} in epoch {}, batch {} of {n_batches} (optimizer step {step}): \
                     the training diverged (try a lower --lr); {}",
                    epoch + 1,
                    i + 1,
                    self.last_good
                );
            }
            progress.batch(indices.len(), loss);
        }
        drop(images);
        Ok(progress.finish())
    }

    /// After `done` epochs: refuses non-finite weights, evaluates, logs, and
    /// writes `last` (and `best` when it is the best so far).
    fn evaluate_and_save(&mut self, done: usize) -> Result<Evaluation> {
        let plan = self.plan;
        let last_good = &self.last_good;
        // Parameters are checked (while taken for the checkpoint) before the
        // evaluation, whose anomaly maps would only be the symptom of
        // non-finite weights.
        let (weights_bytes, optimizer_bytes) = match self.engine.checkpoint_bytes(&self.adam) {
            Ok(bytes) => bytes,
            Err(e) => match e.downcast_ref::<NonFinite>() {
                Some(NonFinite(what)) => bail!(
                    "the training diverged in epoch {done} (optimizer step {}): {what} \
                     (try a lower --lr); {last_good}",
                    self.adam.step_count()
                ),
                None => return Err(e),
            },
        };
        let eval = evaluate_cached(
            &self.engine,
            &self.test,
            self.caches.as_mut().map(|c| &mut c.test),
        )
        .with_context(|| {
            format!("the evaluation after epoch {done} failed, so it was not saved; {last_good}")
        })?;
        // Undefined metrics count as 0: the test set, and so which metrics
        // exist, is the same at every evaluation of the run.
        let score = [
            eval.metrics.image_auroc.unwrap_or(0.0),
            eval.metrics.pixel_auroc.unwrap_or(0.0),
        ];
        let is_best = self
            .best_score
            .is_none_or(|b| score[0] > b[0] || (score[0] == b[0] && score[1] > b[1]));
        if is_best {
            self.best_score = Some(score);
        }
        println!(
            "eval @ epoch {done}: image AUROC {}, pixel AUROC {}, AU-PRO {}{}",
            fmt_opt(eval.metrics.image_auroc),
            fmt_opt(eval.metrics.pixel_auroc),
            fmt_opt(eval.metrics.aupro),
            if is_best { "  (best so far)" } else { "" }
        );
        append_json_line(
            &self.run.eval_log(),
            &EvalLogLine {
                epoch: done,
                optimizer_step: self.adam.step_count(),
                metrics: &eval.metrics,
                map_range: eval.map_range,
                best: is_best,
            },
        )?;
        let adam_cfg = self.adam_cfg;
        let meta = |name: &str, weights_hash: String, optimizer_hash: String| CheckpointMeta {
            format: FORMAT.to_string(),
            config: plan.cfg.clone(),
            backbone_weights: plan.weights.to_arg(),
            epoch: done,
            seed: plan.seed,
            metrics: Some(eval.metrics.clone()),
            threshold: eval.metrics.threshold,
            pixel_threshold: eval.metrics.pixel_threshold,
            map_range: Some(eval.map_range),
            best_score: self.best_score,
            optimizer: OptimizerMeta {
                kind: "adam".into(),
                step: self.adam.step_count(),
                lr: adam_cfg.lr,
                weight_decay: adam_cfg.weight_decay,
                beta1: adam_cfg.beta1,
                beta2: adam_cfg.beta2,
                eps: adam_cfg.eps,
            },
            train: self.train_meta.clone(),
            train_seconds: self.prior_seconds + self.start.elapsed().as_secs_f64(),
            weights_file: format!("{name}.safetensors"),
            weights_hash,
            optimizer_file: format!("{name}.optim.safetensors"),
            optimizer_hash,
        };
        let last = self.run.last();
        let bytes = CheckpointBytes::new(&weights_bytes, &optimizer_bytes);
        write_checkpoint(&last, None, &bytes, |w, o| meta("last", w, o))?;
        if is_best {
            write_checkpoint(&self.run.best(), Some(&last), &bytes, |w, o| {
                meta("best", w, o)
            })?;
        }
        self.last_good = LastGood(Some((last.meta.clone(), done)));
        Ok(eval)
    }

    /// The final report and `--json`, from the last evaluation (or, when
    /// nothing was left to train, a fresh one of the checkpoint).
    fn finish(mut self, last_eval: Option<(usize, Evaluation)>) -> Result<TrainOutcome> {
        let plan = self.plan;
        // Training time over the whole run, resumed parts included.
        let train_seconds = self.prior_seconds + self.start.elapsed().as_secs_f64();
        let (epoch, evaluation) = match last_eval {
            Some(e) => e,
            None => (
                self.start_epoch,
                evaluate_cached(
                    &self.engine,
                    &self.test,
                    self.caches.as_mut().map(|c| &mut c.test),
                )?,
            ),
        };
        let md = markdown_report(
            &ReportContext {
                title: format!("FastFlow training: {}", plan.data.category),
                facts: vec![
                    (
                        "data".into(),
                        format!("{} / {}", plan.data.data.display(), plan.data.category),
                    ),
                    ("config".into(), describe_config(&plan.cfg)),
                    ("backbone weights".into(), plan.weights.describe()),
                    ("epochs".into(), epoch.to_string()),
                    ("batch size".into(), plan.batch_size.to_string()),
                    ("seed".into(), plan.seed.to_string()),
                    (
                        "training time incl. evaluations (s)".into(),
                        format!("{train_seconds:.1}"),
                    ),
                    (
                        "checkpoints".into(),
                        self.run.checkpoints().display().to_string(),
                    ),
                ],
            },
            &evaluation.metrics,
        );
        write_atomic(&self.run.report(), md.as_bytes())?;
        if let Some(json) = &plan.json {
            write_json_atomic(
                json,
                &TrainJson {
                    metrics: &evaluation.metrics,
                    epochs: epoch,
                    train_seconds,
                },
            )?;
        }
        Ok(TrainOutcome {
            run: self.run,
            evaluation,
            train_seconds,
        })
    }
}

/// The feature caches of one run: training and test images.
struct Caches {
    train: FeatureStore,
    test: FeatureStore,
}

/// Decides, announces and creates the run's feature caches (`None`: off).
fn feature_caches(
    plan: &TrainPlan,
    engine: &Engine,
    loader: &Loader,
    run: &RunDir,
    n_test: usize,
) -> Result<Option<Caches>> {
    let mut choice = plan.feature_cache;
    if loader.augments() && choice != FeatureCacheArg::Off {
        println!("note: augmentation is on, so each epoch sees different images: no feature cache");
        choice = FeatureCacheArg::Off;
    }
    let shapes = engine.model.head().feature_shapes().to_vec();
    let per_image = feature_cache::bytes_per_image(&shapes);
    let budget = plan
        .feature_cache_mb
        .map_or_else(feature_cache::default_budget, |mb| mb << 20);
    let n_train = loader.len();
    let Some(cache) = feature_cache::plan(
        choice,
        budget,
        per_image,
        n_train + n_test,
        plan.batch_size,
        feature_cache::TrainsOn::of(&plan.device),
    )?
    else {
        println!("feature cache: off (the backbone runs on every batch)");
        return Ok(None);
    };
    let train_path = run.root.join("feature-cache.train.bin");
    let test_path = run.root.join("feature-cache.test.bin");
    let place = match cache.placement {
        Placement::Ram => format!(
            "in memory (budget {})",
            feature_cache::human_bytes(cache.budget)
        ),
        Placement::Device => "in GPU memory".to_string(),
        Placement::Disk => format!(
            "on disk in '{}' and '{}', removed at the end (memory budget {})",
            train_path.display(),
            test_path.display(),
            feature_cache::human_bytes(cache.budget)
        ),
    };
    println!(
        "feature cache: {n_train} training + {n_test} test images x {} = {}, {place}",
        feature_cache::human_bytes(per_image),
        feature_cache::human_bytes(cache.bytes),
    );
    Ok(Some(Caches {
        train: FeatureStore::new(n_train, &shapes, cache.placement, &train_path)?,
        test: FeatureStore::new(n_test, &shapes, cache.placement, &test_path)?,
    }))
}

/// The checkpoint a failed run can be resumed from, as its error messages say it.
struct LastGood(Option<(PathBuf, usize)>);

impl std::fmt::Display for LastGood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((meta, epoch)) => write!(
                f,
                "no checkpoint was written after epoch {epoch}: the last good one is '{}'",
                meta.display()
            ),
            None => write!(f, "no checkpoint of this run had been written yet"),
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointPaths;
    use crate::config::parse_yaml;
    use crate::data::DatasetFormat;
    use crate::fsutil::fault;
    use ff_data::synth::{generate_category, SynthConfig};

    /// A ResNet18 FastFlow at 64 px on 4 synthetic images, 1 batch per epoch.
    fn tiny_plan(root: &Path, epochs: usize) -> TrainPlan {
        let data = root.join("data");
        if !data.exists() {
            let synth = SynthConfig {
                image_size: 64,
                n_train: 4,
                n_test_good: 2,
                n_test_defect: 2,
                seed: 1,
            };
            generate_category(&data, "tiny", &synth).expect("synthetic data");
        }
        let cfg: FastFlowConfig = parse_yaml(
            "backbone_name: resnet18\ninput_size: 64\nflow_step: 2\nhidden_ratio: 0.5\nconv3x3_only: True\n",
        )
        .expect("config");
        TrainPlan {
            cfg,
            data: DataArgs {
                data,
                category: "tiny".into(),
                format: DatasetFormat::Mvtec,
                normal_dir: "good".into(),
                abnormal_dir: "bad".into(),
                normal_test_dir: None,
                mask_dir: None,
            },
            epochs,
            batch_size: 4,
            lr: 1e-3,
            weight_decay: 1e-5,
            eval_every: 1,
            seed: 7,
            weights: WeightSource::Random { seed: 7 },
            run_dir: root.join("run"),
            resume: None,
            json: None,
            device: candle_core::Device::Cpu,
            feature_cache: FeatureCacheArg::Auto,
            feature_cache_mb: None,
            augment: false,
        }
    }

    fn files(paths: &CheckpointPaths) -> Vec<Vec<u8>> {
        [&paths.weights, &paths.optimizer, &paths.meta]
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect()
    }

    /// A disk that fills up while a checkpoint is written, at each of its
    /// three files in turn: the run stops with an error naming the
    /// checkpoint and the file, and the previous checkpoint stays whole,
    /// loadable and resumable; no temporary file is left behind.
    #[test]
    fn a_write_failing_mid_run_keeps_the_previous_checkpoint() -> Result<()> {
        let dir = tempfile::tempdir()?;
        train(&tiny_plan(dir.path(), 1))?;
        let run = RunDir::new(dir.path().join("run"));
        let before = files(&run.last());
        for (n, file) in [
            (1, "last.safetensors"),
            (2, "last.optim.safetensors"),
            (3, "last.json"),
        ] {
            let mut plan = tiny_plan(dir.path(), 2);
            plan.resume = Some(run.last());
            fault::fail_write(n);
            let err = format!("{:#}", train(&plan).expect_err("the write should fail"));
            for needle in [
                "cannot save checkpoint",
                "last.json",
                file,
                "No space left on device",
                "the previous checkpoint there is unchanged",
            ] {
                assert!(err.contains(needle), "write {n}: '{needle}' not in: {err}");
            }
            assert_eq!(
                files(&run.last()),
                before,
                "write {n} changed the checkpoint"
            );
            assert_eq!(read_meta(&run.last())?.epoch, 1);
            let leftovers: Vec<_> = std::fs::read_dir(run.checkpoints())?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp-"))
                .collect();
            assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        }
        // The kept checkpoint still resumes.
        let mut plan = tiny_plan(dir.path(), 2);
        plan.resume = Some(run.last());
        train(&plan)?;
        assert_eq!(read_meta(&run.last())?.epoch, 2);
        Ok(())
    }

    /// `best` saved in the same epoch as `last` shares its tensor files
    /// (hard links, where the file system has them), and a later save of
    /// `last` leaves `best` whole and loadable.
    #[test]
    fn best_shares_the_tensor_files_of_last_until_last_is_saved_again() -> Result<()> {
        let dir = tempfile::tempdir()?;
        train(&tiny_plan(dir.path(), 1))?;
        let run = RunDir::new(dir.path().join("run"));
        let (last, best) = (run.last(), run.best());
        let best_files = files(&best);
        assert_eq!(files(&last)[..2], best_files[..2]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino());
            assert_eq!(inode(&last.weights)?, inode(&best.weights)?);
            assert_eq!(inode(&last.optimizer)?, inode(&best.optimizer)?);
        }
        let meta = read_meta(&last)?;
        let bytes = CheckpointBytes::new(b"other weights", b"other optimizer");
        write_checkpoint(&last, None, &bytes, |w, o| CheckpointMeta {
            weights_hash: w,
            optimizer_hash: o,
            ..meta
        })?;
        assert_eq!(std::fs::read(&last.weights)?, b"other weights");
        assert_eq!(files(&best), best_files);
        assert_eq!(read_meta(&best)?.epoch, 1);
        Ok(())
    }

    /// Non-finite weights are never written: the error names the tensor,
    /// and the checkpoint written before stays the last good one.
    #[test]
    fn non_finite_parameters_are_never_saved() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let plan = tiny_plan(dir.path(), 1);
        let backbone = load_backbone(plan.cfg.backbone_kind()?, &plan.weights, &plan.device)?;
        let engine = Engine::new(&plan.cfg, backbone, plan.seed, &plan.device)?;
        let adam = engine.optimizer(AdamConfig::default())?;
        assert!(engine.checkpoint_bytes(&adam).is_ok());
        let vars = engine.model.trainable_vars()?;
        let (key, var) = &vars[vars.len() / 2];
        let poisoned = var.as_tensor().affine(0.0, f64::NAN)?;
        var.set(&poisoned)?;
        let what = format!("parameter '{key}' holds NaN");
        let err = engine.checkpoint_bytes(&adam).unwrap_err();
        assert_eq!(
            err.downcast_ref::<NonFinite>().map(|e| e.0.as_str()),
            Some(what.as_str())
        );
        let err = format!("{err:#}");
        assert!(err.contains(&what), "{err}");
        Ok(())
    }

    #[test]
    fn an_unwritable_run_directory_fails_before_training() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // A regular file where a folder should be: unwritable even for root.
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x")?;
        let mut plan = tiny_plan(dir.path(), 1);
        plan.run_dir = blocker.join("run");
        // A dataset that is not there: reading it first would fail differently.
        plan.data.data = dir.path().join("no-such-dataset");
        let err = format!("{:#}", train(&plan).expect_err("must fail"));
        assert!(err.contains("is not writable"), "{err}");
        assert!(err.contains(&blocker.display().to_string()), "{err}");
        Ok(())
    }
}
