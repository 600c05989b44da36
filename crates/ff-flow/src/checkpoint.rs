//! Checkpoints: ours (safetensors bytes with the reference's `state_dict`
//! keys; the caller writes them) and the reference's `.pt` files, read by candle's
//! pickle interpreter, which understands the opcodes and never executes code.

use std::collections::HashMap;
use std::path::Path;

use candle_core::pickle::PthTensors;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::FastFlow;

/// The state-dict prefix of the backbone in the reference's model.
pub const BACKBONE_PREFIX: &str = "feature_extractor.";

/// A checkpoint as the bytes of one safetensors file: the model's trainable
/// tensors and permutation buffers under the reference's `state_dict` keys,
/// plus `extra` tensors (e.g. optimizer state under a prefix of the caller's
/// choice). Where and how the bytes land is the caller's choice (`fastflow`
/// stages the files of a checkpoint and then renames them into place); read
/// them back with [`load_safetensors`] and [`load_state_dict`].
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
    // The reference's checkpoints keep the state dict under
    // `model_state_dict`; a bare state dict has its tensors at the top.
    let pth = match PthTensors::new(path, Some("model_state_dict")) {
        Ok(p) => p,
        Err(nested) => match PthTensors::new(path, None) {
            Ok(p) if !p.tensor_infos().is_empty() => p,
            _ => return Err(read_err(nested)),
        },
    };
    let mut out = HashMap::new();
    for name in pth.tensor_infos().keys() {
        if let Some(t) = pth.get(name).map_err(read_err)? {
            out.insert(name.clone(), t);
        }
    }
    if out.is_empty() {
        return Err(Error::NotACheckpoint {
            path: path.to_path_buf(),
        });
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
