//! Checkpoints: ours (safetensors with the reference's `state_dict` keys,
//! written atomically) and the reference's `.pt` files, read by candle's
//! pickle interpreter, which understands the opcodes and never executes code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::FastFlow;

/// The state-dict prefix of the backbone in the reference's model.
pub const BACKBONE_PREFIX: &str = "feature_extractor.";

/// Writes the model's trainable tensors and permutation buffers (reference
/// keys), plus `extra` tensors (e.g. optimizer state under a prefix of the
/// caller's choice), to a safetensors file. The file appears atomically: it
/// is written to a temporary name in the same folder and renamed.
pub fn save_checkpoint(
    path: impl AsRef<Path>,
    model: &FastFlow,
    extra: &HashMap<String, Tensor>,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = checkpoint_bytes(model, extra).map_err(serialize_error(path))?;
    write_file_atomically(path, &bytes)
}

/// The bytes [`save_checkpoint`] writes: the model's state dict plus `extra`
/// as one safetensors file. For callers that stage several files before any
/// of them replaces an older one.
pub fn checkpoint_bytes(model: &FastFlow, extra: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut tensors = model.state_dict()?;
    for (k, v) in extra {
        if tensors.contains_key(k) {
            return Err(Error::UnexpectedTensors {
                keys: vec![format!("{k} (an extra tensor with a model key)")],
            });
        }
        tensors.insert(k.clone(), v.clone());
    }
    tensors_bytes(&tensors)
}

/// `tensors` as the bytes of a safetensors file, exactly as
/// `candle_core::safetensors::save` writes them (keys sorted, no metadata).
pub fn tensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    // Tensors on an accelerator, or views, are brought to contiguous CPU
    // memory first: safetensors stores plain row-major bytes.
    let mut cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(cpu, None).map_err(|e| Error::Candle(candle_core::Error::wrap(e)))
}

/// Writes `tensors` to `path` as safetensors through a temporary file and a rename.
pub fn save_tensors_atomically(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let bytes = tensors_bytes(tensors).map_err(serialize_error(path))?;
    write_file_atomically(path, &bytes)
}

/// A tensor failure while serialising for `path`, named as such.
fn serialize_error(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Candle(source) => Error::SerializeCheckpoint {
            path: path.to_path_buf(),
            source,
        },
        e => e,
    }
}

/// `bytes` to `path` through a synced temporary sibling and a rename.
fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp: PathBuf = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    written
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            Error::WriteCheckpoint {
                path: path.to_path_buf(),
                source,
            }
        })
}

/// Reads every tensor of a safetensors file (to the CPU).
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| Error::ReadCheckpoint {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads trainable tensors and permutations into `model`; see
/// [`crate::FastFlowHead::load_state_dict`]. Errors name the key and the
/// expected and found shapes; nothing changes unless everything fits.
pub fn load_state_dict(model: &mut FastFlow, sd: &HashMap<String, Tensor>) -> Result<()> {
    model.head_mut().load_state_dict(sd)
}

/// Reads the `model_state_dict` of a checkpoint written by gathierry/FastFlow
/// (`torch.save({"epoch", "model_state_dict", "optimizer_state_dict"})`, a
/// torch zip archive holding a pickle). A file holding a bare state dict is
/// accepted too. The pickle is interpreted opcode by opcode by candle's
/// reader, which builds plain values and never runs code from the file.
///
/// Returns every tensor under its reference key (`feature_extractor.*`,
/// `norms.*`, `nf_flows.*`), in the dtype stored in the file.
pub fn read_reference_pt(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let read_err = |source: candle_core::Error| Error::ReadCheckpoint {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_file() {
        return Err(read_err(candle_core::Error::Msg(
            "no such file".to_string(),
        )));
    }
    let pth = match PthTensors::new(path, Some("model_state_dict")) {
        Ok(p) => p,
        Err(e) if e.to_string().contains("not found") => {
            PthTensors::new(path, None).map_err(read_err)?
        }
        Err(e) => return Err(read_err(e)),
    };
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        if let Some(t) = pth.get(name).map_err(read_err)? {
            out.insert(name.clone(), t);
        }
    }
    if out.is_empty() {
        return Err(read_err(candle_core::Error::Msg(
            "it holds no tensors under 'model_state_dict' (is it a FastFlow checkpoint?)"
                .to_string(),
        )));
    }
    Ok(out)
}

/// A reference state dict split into its frozen and trainable parts.
#[derive(Debug, Clone, Default)]
pub struct ReferenceStateDict {
    /// `feature_extractor.*` tensors with that prefix removed (timm keys, for
    /// the backbone's `VarBuilder::from_tensors`).
    pub backbone: HashMap<String, Tensor>,
    /// `norms.*` and `nf_flows.*` tensors, for [`load_state_dict`].
    pub flow: HashMap<String, Tensor>,
}

/// Splits a reference state dict into backbone and flow parts.
pub fn split_reference_state_dict(sd: HashMap<String, Tensor>) -> ReferenceStateDict {
    let mut out = ReferenceStateDict::default();
    for (k, v) in sd {
        match k.strip_prefix(BACKBONE_PREFIX) {
            Some(rest) => {
                out.backbone.insert(rest.to_string(), v);
            }
            None => {
                out.flow.insert(k, v);
            }
        }
    }
    out
}
