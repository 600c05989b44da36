//! Evaluation: anomaly maps of a test set into ff-metrics, and the `eval`
//! command (table on stdout, Markdown next to the checkpoint, optional JSON).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ff_data::{Label, Loader, LoaderConfig, Preprocess, Sample};
use ff_metrics::Evaluator;

use crate::cli::EvalArgs;
use crate::data::{images_tensor, load_split, DataArgs};
use crate::engine::{describe_config, open_model, Engine, OpenedModel};
use crate::feature_cache::FeatureStore;
use crate::report::{markdown_report, metrics_table, write_metrics_json, Metrics, ReportContext};

/// The result of evaluating a model on a test set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub metrics: Metrics,
    /// Lowest and highest anomaly-map value over the test set.
    pub map_range: [f32; 2],
}

/// Whether a test loader keeps the images it decoded for later passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedImages {
    /// Kept, for the later evaluations of a training run.
    Keep,
    /// Dropped after each batch (one evaluation).
    Drop,
}

/// A loader over a test set, with masks when every anomalous sample has one.
pub fn test_loader(
    test: &[Sample],
    input_size: usize,
    batch_size: usize,
    decoded: DecodedImages,
) -> Loader {
    let mut cfg = LoaderConfig::new(batch_size.max(1));
    cfg.with_masks = test
        .iter()
        .all(|s| s.label == Label::Normal || s.mask.is_some());
    cfg.cache = decoded == DecodedImages::Keep;
    Loader::new(test.to_vec(), Preprocess::imagenet(input_size), cfg)
}

/// Evaluates `engine` on `test` (every sample labelled; masks used when all
/// anomalous samples have one).
pub fn evaluate(engine: &Engine, test: &[Sample], batch_size: usize) -> Result<Evaluation> {
    let loader = test_loader(
        test,
        engine.config().input_size,
        batch_size,
        DecodedImages::Drop,
    );
    evaluate_cached(engine, &loader, None)
}

/// Evaluates `engine` on the samples of a test loader built by
/// [`test_loader`], with an optional feature cache of the loader's samples:
/// images whose features it holds skip the backbone; the others fill it. The
/// reported inference speed then adds the backbone time measured when the
/// cache was filled to this evaluation's own time, so it stays the speed of
/// the whole model.
pub fn evaluate_cached(
    engine: &Engine,
    loader: &Loader,
    mut cache: Option<&mut FeatureStore>,
) -> Result<Evaluation> {
    anyhow::ensure!(!loader.is_empty(), "the test set is empty");
    let size = engine.config().input_size;
    let mut evaluator = Evaluator::new();
    let mut model_seconds = 0.0;
    let mut range = [f32::INFINITY, f32::NEG_INFINITY];
    // Backbone time of earlier evaluations that filled the cache.
    let earlier_backbone_seconds = cache.as_deref().map_or(0.0, FeatureStore::backbone_seconds);
    for (indices, batch) in loader.batch_indices(0).iter().zip(loader.epoch(0)) {
        let batch = batch.context("cannot load a test batch")?;
        let start = Instant::now();
        let features = match cache.as_deref_mut() {
            Some(store) if store.has_all(indices) => store.load(indices, &engine.device)?,
            Some(store) => {
                let missing = store.missing(indices);
                store.fill(engine, &batch, indices, &missing, &engine.device)?;
                store.load(indices, &engine.device)?
            }
            None => engine.features(&images_tensor(&batch, &engine.device)?)?,
        };
        let maps = engine.anomaly_maps_features(features)?;
        model_seconds += start.elapsed().as_secs_f64();
        if let Some(pos) = maps.iter().position(|v| !v.is_finite()) {
            let image = pos / (size * size);
            anyhow::bail!(
                "the anomaly map of '{}' holds {}: the model does not give finite scores",
                batch.paths[image].display(),
                maps[pos]
            );
        }
        for &v in &maps {
            range[0] = range[0].min(v);
            range[1] = range[1].max(v);
        }
        let labels: Vec<bool> = batch
            .labels
            .iter()
            .map(|l| *l == Label::Anomalous)
            .collect();
        let masks = batch.masks.as_deref().unwrap_or(&[]);
        evaluator
            .update(&maps, masks, &labels, batch.n, size, size)
            .context("cannot accumulate the evaluation")?;
    }
    model_seconds += earlier_backbone_seconds;
    let report = evaluator.compute().context("cannot compute the metrics")?;
    let img_per_s = report.n_images as f64 / model_seconds.max(1e-9);
    Ok(Evaluation {
        metrics: Metrics::from_report(&report, Some(img_per_s)),
        map_range: range,
    })
}

/// Where the Markdown report of evaluating `checkpoint` on `category` goes.
pub fn eval_report_path(checkpoint: &Path, category: &str) -> PathBuf {
    let stem = checkpoint
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(".optim").unwrap_or(&stem).to_string();
    checkpoint.with_file_name(format!("{stem}.eval-{category}.md"))
}

/// What `fastflow eval` does, resolved from its flags: the model opened,
/// the test data to read, and where the results go.
pub struct EvalPlan {
    pub opened: OpenedModel,
    pub data: DataArgs,
    pub batch_size: usize,
    pub json: Option<PathBuf>,
}

impl EvalPlan {
    /// Opens the model `args` name (errors name the checkpoint or config).
    pub fn from_args(args: EvalArgs) -> Result<Self> {
        Ok(Self {
            opened: open_model(&args.model)?,
            data: args.data,
            batch_size: args.model.batch_size,
            json: args.report.json,
        })
    }
}

/// `fastflow eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    run_eval_plan(&EvalPlan::from_args(args)?)
}

/// Evaluates the plan's model on its test set and writes the Markdown report
/// beside the checkpoint (and the metrics as JSON when asked).
pub fn run_eval_plan(plan: &EvalPlan) -> Result<()> {
    let EvalPlan {
        opened,
        data,
        batch_size,
        json,
    } = plan;
    let engine = &opened.engine;
    let mut facts = match &opened.meta {
        None => vec![(
            "checkpoint".to_string(),
            format!("{} (reference .pt)", opened.file.display()),
        )],
        Some(meta) => vec![
            ("checkpoint".to_string(), opened.file.display().to_string()),
            ("epoch".to_string(), meta.epoch.to_string()),
            (
                "backbone weights".to_string(),
                meta.backbone_weights.clone(),
            ),
        ],
    };
    // A folder dataset holds out good images for testing by the run's seed;
    // the same seed keeps training images out of the test set.
    let split_seed = opened.meta.as_ref().map_or(0, |m| m.seed);
    let split = load_split(data, split_seed)?;
    let eval = evaluate(engine, &split.test, *batch_size)?;
    println!("{}", metrics_table(&eval.metrics));
    facts.push((
        "data".into(),
        format!("{} / {}", data.data.display(), data.category),
    ));
    facts.push(("config".into(), describe_config(engine.config())));
    let md = markdown_report(
        &ReportContext {
            title: format!("FastFlow evaluation: {}", data.category),
            facts,
        },
        &eval.metrics,
    );
    // The report goes beside the checkpoint file (also when a run directory
    // named it).
    let md_path = eval_report_path(&opened.file, &data.category);
    crate::fsutil::write_atomic(&md_path, md.as_bytes())?;
    println!("report: {}", md_path.display());
    if let Some(json) = json {
        write_metrics_json(json, &eval.metrics)?;
        println!("metrics: {}", json.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::load_backbone;
    use ff_backbone::{BackboneKind, WeightSource};
    use ff_data::synth::{generate_category, SynthConfig};

    /// A model whose weights make NaN maps is refused with the image named,
    /// before any metric turns the NaN into a number.
    #[test]
    fn non_finite_maps_name_the_image() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let synth = SynthConfig {
            image_size: 64,
            n_train: 1,
            n_test_good: 1,
            n_test_defect: 1,
            seed: 1,
        };
        generate_category(dir.path(), "c", &synth)?;
        let split = ff_data::mvtec_category(dir.path(), "c")?;
        let cfg: ff_flow::FastFlowConfig = crate::config::parse_yaml(
            "backbone_name: resnet18\ninput_size: 64\nflow_step: 1\nhidden_ratio: 0.5\nconv3x3_only: True\n",
        )?;
        let device = candle_core::Device::Cpu;
        let backbone = load_backbone(
            BackboneKind::ResNet18,
            &WeightSource::Random { seed: 1 },
            &device,
        )?;
        let engine = Engine::new(&cfg, backbone, 1, &device)?;
        assert!(evaluate(&engine, &split.test, 2).is_ok());
        for (_, var) in engine.model.trainable_vars()? {
            var.set(&var.as_tensor().affine(0.0, f64::NAN)?)?;
        }
        let err = format!("{:#}", evaluate(&engine, &split.test, 2).unwrap_err());
        let first = split.test[0].path.display().to_string();
        assert!(
            err.contains(&format!("the anomaly map of '{first}' holds NaN")),
            "{err}"
        );
        Ok(())
    }
}
