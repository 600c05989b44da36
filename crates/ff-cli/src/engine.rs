//! The model as the commands use it: building FastFlow from a config, a
//! checkpoint of ours or a reference `.pt`, one training step, anomaly maps as
//! plain buffers, and saving/restoring checkpoints with the optimizer state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ff_backbone::{Backbone, BackboneKind, WeightSource};
use ff_flow::{Adam, AdamConfig, FastFlow, FastFlowConfig};

use crate::checkpoint::{read_meta, CheckpointKind, CheckpointMeta, CheckpointPaths};
use crate::cli::{DeviceArg, ModelArgs};

/// The device the user asked for; CUDA only in binaries built with `--features cuda`.
pub fn device(arg: DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Device::new_cuda(0).context("cannot open CUDA device 0"),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda => bail!(
            "this fastflow was built without CUDA support; rebuild with \
             `cargo build --release -p ff-cli --features cuda` or use --device cpu"
        ),
    }
}

/// A `--weights` value as a weight source. `random` takes the run's seed so
/// that the whole run is fixed by `--seed`.
pub fn parse_weights(value: &str, kind: BackboneKind, seed: u64) -> Result<WeightSource> {
    if value.trim() == "random" {
        return Ok(WeightSource::Random { seed });
    }
    WeightSource::parse(value, kind).map_err(anyhow::Error::from)
}

/// Loads the backbone, with the source named in the error.
pub fn load_backbone(
    kind: BackboneKind,
    source: &WeightSource,
    device: &Device,
) -> Result<Backbone> {
    Backbone::load(kind, source, device)
        .with_context(|| format!("cannot load the {kind} backbone from {}", source.describe()))
}

/// FastFlow with its trainable tensors in a `VarMap`.
pub struct Engine {
    pub model: FastFlow,
    pub device: Device,
    /// Kept alive because the model's trainable tensors live in it.
    _varmap: VarMap,
}

impl Engine {
    /// A new model: trainable tensors and permutations drawn from `seed`.
    pub fn new(
        cfg: &FastFlowConfig,
        backbone: Backbone,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model =
            FastFlow::new(cfg, backbone, seed, vb).context("cannot build the FastFlow model")?;
        Ok(Self {
            model,
            device: device.clone(),
            _varmap: varmap,
        })
    }

    /// The model of one of our checkpoints (weights only; see [`Engine::restore_optimizer`]).
    pub fn from_checkpoint(
        meta: &CheckpointMeta,
        paths: &CheckpointPaths,
        backbone: Backbone,
        device: &Device,
    ) -> Result<Self> {
        let mut engine = Self::new(&meta.config, backbone, meta.seed, device)?;
        let sd = ff_flow::load_safetensors(&paths.weights)?;
        let sd = to_device(sd, device)?;
        ff_flow::load_state_dict(&mut engine.model, &sd).with_context(|| {
            format!(
                "checkpoint '{}' does not fit the model of its config ({})",
                paths.weights.display(),
                describe_config(&meta.config)
            )
        })?;
        Ok(engine)
    }

    /// The model of a gathierry/FastFlow `.pt` file as `eval` and `predict`
    /// take it: `config` (required: a `.pt` does not say which model it is)
    /// and an optional `--weights` override for the backbone.
    pub fn open_reference(
        path: &Path,
        config: Option<&Path>,
        weights: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let cfg_path = config.with_context(|| {
            format!(
                "'{}' is a reference .pt checkpoint: pass --config to say which model it is",
                path.display()
            )
        })?;
        let cfg = crate::config::load_model_config(cfg_path)?;
        let weights = weights
            .map(|w| parse_weights(w, cfg.backbone_kind()?, 0))
            .transpose()?;
        Self::from_reference_pt(path, &cfg, weights.as_ref(), device)
    }

    /// The model of a gathierry/FastFlow `.pt` file: backbone and flows both
    /// come from the file unless `weights` names another backbone source.
    pub fn from_reference_pt(
        path: &Path,
        cfg: &FastFlowConfig,
        weights: Option<&WeightSource>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate().context("invalid config")?;
        let kind = cfg.backbone_kind()?;
        let sd = ff_flow::read_reference_pt(path)?;
        let parts = ff_flow::split_reference_state_dict(sd);
        let backbone = match weights {
            Some(source) => load_backbone(kind, source, device)?,
            None => {
                if parts.backbone.is_empty() {
                    bail!(
                        "'{}' holds no feature_extractor.* tensors; pass --weights hub (or a file) for the backbone",
                        path.display()
                    );
                }
                let tensors = to_device(parts.backbone, device)?
                    .into_iter()
                    .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
                    .collect::<Result<HashMap<_, _>>>()?;
                let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
                Backbone::new(kind, vb).with_context(|| {
                    format!(
                        "the backbone in '{}' is not a {kind} ({})",
                        path.display(),
                        describe_config(cfg)
                    )
                })?
            }
        };
        let mut engine = Self::new(cfg, backbone, 0, device)?;
        let flow = to_device(parts.flow, device)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        ff_flow::load_state_dict(&mut engine.model, &flow).with_context(|| {
            format!(
                "reference checkpoint '{}' does not fit the config ({})",
                path.display(),
                describe_config(cfg)
            )
        })?;
        Ok(engine)
    }

    pub fn config(&self) -> &FastFlowConfig {
        self.model.config()
    }

    /// Adam over the trainable tensors (norms and flows only).
    pub fn optimizer(&self, cfg: AdamConfig) -> Result<Adam> {
        Ok(Adam::new(self.model.trainable_vars()?, cfg)?)
    }

    /// One optimizer step on a batch; returns the loss before the step.
    ///
    /// # Shapes
    /// `images`: `[b, 3, S, S]`.
    pub fn train_step(&self, adam: &mut Adam, images: &Tensor) -> Result<f64> {
        self.train_step_features(adam, self.features(images)?)
    }

    /// The frozen backbone's features of a batch.
    ///
    /// # Shapes
    /// `images`: `[b, 3, S, S]` -> one `[b, C_i, h_i, w_i]` per scale.
    pub fn features(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.model.features(images)?)
    }

    /// [`Engine::train_step`] on backbone features computed before.
    ///
    /// # Shapes
    /// `features`: as [`Engine::features`] returns them.
    pub fn train_step_features(&self, adam: &mut Adam, features: Vec<Tensor>) -> Result<f64> {
        let out = self.model.forward_features_for_training(features)?;
        let (loss, grads) = ff_flow::loss_and_grads(&out)?;
        adam.step(&grads)?;
        Ok(f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?))
    }

    /// Anomaly maps of a batch as a row-major buffer, higher = more anomalous.
    ///
    /// # Shapes
    /// `images`: `[b, 3, S, S]` -> `b * S * S` values (`[b, S, S]`).
    pub fn anomaly_maps(&self, images: &Tensor) -> Result<Vec<f32>> {
        self.anomaly_maps_features(self.features(images)?)
    }

    /// [`Engine::anomaly_maps`] on backbone features computed before.
    pub fn anomaly_maps_features(&self, features: Vec<Tensor>) -> Result<Vec<f32>> {
        let out = self.model.forward_features(features)?;
        let map = self.model.anomaly_map(&out)?;
        Ok(map.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The two tensor files of a checkpoint as bytes: the model's state dict
    /// and Adam's state (see [`crate::checkpoint::write_checkpoint`]). The
    /// tensors are read once, for the finiteness check and the bytes.
    ///
    /// # Errors
    /// [`NonFinite`] (under "refusing to save a checkpoint") when a parameter
    /// or an optimizer moment holds a NaN or an infinity: such a checkpoint
    /// is never written.
    pub fn checkpoint_bytes(&self, adam: &Adam) -> Result<(Vec<u8>, Vec<u8>)> {
        let weights = self.model.state_dict()?;
        let optimizer = adam.state_tensors()?;
        if let Some(what) = first_non_finite_in(&weights, &optimizer)? {
            return Err(
                anyhow::Error::new(NonFinite(what)).context("refusing to save a checkpoint")
            );
        }
        Ok((
            ff_flow::checkpoint::tensors_bytes(&weights)?,
            ff_flow::checkpoint::tensors_bytes(&optimizer)?,
        ))
    }

    /// Restores Adam's state saved with a checkpoint.
    pub fn restore_optimizer(
        &self,
        adam: &mut Adam,
        paths: &CheckpointPaths,
        step: u64,
    ) -> Result<()> {
        let state = to_device(ff_flow::load_safetensors(&paths.optimizer)?, &self.device)?;
        adam.load_state(step, &state).with_context(|| {
            format!(
                "optimizer state '{}' does not fit the model",
                paths.optimizer.display()
            )
        })
    }
}

/// A model opened from `--checkpoint`: the engine, the metadata of a
/// checkpoint of ours (`None` for a reference `.pt`), and the checkpoint
/// file that was read (reports go beside it).
pub struct OpenedModel {
    pub engine: Engine,
    pub meta: Option<CheckpointMeta>,
    pub file: PathBuf,
}

/// Opens what `--checkpoint` names (ours, a run directory, or a reference
/// `.pt` with `--config`), with `--weights` overriding the backbone; a
/// `--config` given with a checkpoint of ours must match its config.
pub fn open_model(args: &ModelArgs) -> Result<OpenedModel> {
    let device = device(args.run_on.device)?;
    match CheckpointKind::of(&args.checkpoint) {
        CheckpointKind::Reference(path) => {
            let engine = Engine::open_reference(
                &path,
                args.config.as_deref(),
                args.weights.as_deref(),
                &device,
            )?;
            Ok(OpenedModel {
                engine,
                meta: None,
                file: path,
            })
        }
        CheckpointKind::Ours(paths) => {
            let (meta, engine) = load_our_checkpoint(&paths, args.weights.as_deref(), &device)?;
            if let Some(cfg_path) = &args.config {
                let cfg = crate::config::load_model_config(cfg_path)?;
                anyhow::ensure!(
                    cfg == meta.config,
                    "config '{}' ({}) differs from the checkpoint's ({})",
                    cfg_path.display(),
                    describe_config(&cfg),
                    describe_config(&meta.config)
                );
            }
            Ok(OpenedModel {
                engine,
                meta: Some(meta),
                file: paths.weights,
            })
        }
    }
}

/// A parameter or optimizer moment holding a NaN or an infinity, named as
/// "parameter 'key' holds NaN": the training diverged.
#[derive(Debug)]
pub struct NonFinite(pub String);

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFinite {}

/// The first tensor of `weights` (parameters) or `optimizer` (Adam's
/// moments), in key order, that holds a NaN or an infinity.
fn first_non_finite_in(
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<Option<String>> {
    for (what, tensors) in [("parameter", weights), ("optimizer state", optimizer)] {
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        for key in keys {
            let values = tensors[key]
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Ok(Some(format!("{what} '{key}' holds {v}")));
            }
        }
    }
    Ok(None)
}

/// Loads a checkpoint of ours with the backbone it was trained with (or `weights`).
pub fn load_our_checkpoint(
    paths: &CheckpointPaths,
    weights: Option<&str>,
    device: &Device,
) -> Result<(CheckpointMeta, Engine)> {
    let meta = read_meta(paths)?;
    let kind = meta.config.backbone_kind()?;
    let source = parse_weights(weights.unwrap_or(&meta.backbone_weights), kind, meta.seed)?;
    let backbone = load_backbone(kind, &source, device)?;
    let engine = Engine::from_checkpoint(&meta, paths, backbone, device)?;
    Ok((meta, engine))
}

fn to_device(sd: HashMap<String, Tensor>, device: &Device) -> Result<HashMap<String, Tensor>> {
    sd.into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect()
}

/// A one-line description of a config for error messages.
pub fn describe_config(cfg: &FastFlowConfig) -> String {
    format!(
        "backbone_name {}, input_size {}, flow_step {}, hidden_ratio {}, conv3x3_only {}",
        cfg.backbone_name, cfg.input_size, cfg.flow_step, cfg.hidden_ratio, cfg.conv3x3_only
    )
}
