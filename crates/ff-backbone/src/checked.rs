//! Key- and shape-checked tensor access: how every backbone takes its
//! weights from a `VarBuilder`, whatever the source behind it.

use candle_core::{Shape, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The full key of `name` under `vb`'s prefix.
pub fn full_key(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Gets tensor `name` of shape `shape` from `vb`, turning a missing key or a
/// wrong shape into [`Error::MissingTensor`] / [`Error::ShapeMismatch`] with
/// the full key and both shapes.
///
/// # Shapes
/// -> `shape`, exactly.
pub fn get_checked<S: Into<Shape>>(vb: &VarBuilder, shape: S, name: &str) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let key = full_key(vb, name);
    if !vb.contains_tensor(name) {
        return Err(Error::MissingTensor { key });
    }
    match vb.get(shape.clone(), name) {
        Ok(t) if t.dims() == shape.dims() => Ok(t),
        Ok(t) => Err(Error::ShapeMismatch {
            key,
            expected: shape.dims().to_vec(),
            found: t.dims().to_vec(),
        }),
        Err(e) => match vb.get_unchecked(name) {
            Ok(t) if t.dims() != shape.dims() => Err(Error::ShapeMismatch {
                key,
                expected: shape.dims().to_vec(),
                found: t.dims().to_vec(),
            }),
            _ => Err(Error::Candle(e)),
        },
    }
}
