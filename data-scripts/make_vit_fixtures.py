"""Write the timm 0.5.4 DeiT/CaiT feature fixtures that the ff-backbone
transformer parity tests compare against.

Run from the repository root (about a minute and 3 GB of memory, mostly
the full-size CaiT-M48 in float64; needs no network):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_vit_fixtures.py

Every weight comes from ``detweights.fill_module`` (the twin of
``crates/ff-backbone/src/det_init.rs``) and every input from
``vit_input`` below (``det_uniform`` scaled to [-2, 2), the range of an
ImageNet-normalised image), so nothing but outputs is stored. The features
are computed exactly as the FastFlow reference (gathierry/FastFlow
``fastflow.py``) does for its transformer backbones, in float64 so that the
stored target is the exact value and not one float32 rounding of it.

Outputs go to ``tests-fixtures/vit/`` (safetensors):

* ``deit_small.safetensors`` / ``cait_small.safetensors``: timm's
  ``VisionTransformer(distilled=True)`` and ``Cait`` with embed 64, 4 heads,
  depth 3 (of which 2 blocks run, as the reference runs a prefix), patch 16,
  64-px input, batch 2: the full ``output`` [2, 64, 4, 4].
* ``deit_full.safetensors`` / ``cait_full.safetensors``: the real
  ``deit_base_distilled_patch16_384`` (blocks 0..7) and ``cait_m48_448``
  (blocks 0..40), batch 1. The full maps (1.8 MB / 2.4 MB) would exceed the
  fixture budget, so they keep ``output_sub`` (the flattened map at indices
  0, stride, 2 * stride, ...), ``stride`` and the per-channel
  ``channel_mean`` / ``channel_std`` (population std over H x W).

The script also prints the residual-stream spread per block, to show that
det_init's generic roles keep transformer activations in a sane range, and
the float32-vs-float64 difference of timm itself (the noise floor the Rust
tolerance must sit above).
"""

import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detweights import det_uniform, fill_module  # noqa: E402

import timm  # noqa: E402
from timm.models.cait import Cait  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

OUT = os.path.join("tests-fixtures", "vit")
SUB_STRIDE = 11


def vit_input(name, shape):
    """det_uniform(name) * 4, reshaped: the twin of `vit_input` in the Rust tests."""
    n = int(np.prod(shape))
    return torch.from_numpy((det_uniform(name, n) * 4.0).astype(np.float32).reshape(shape))


def deit_features(m, x, n_blocks, trace=None):
    """The reference's DeiT branch (fastflow.py), blocks 0..n_blocks-1."""
    x = m.patch_embed(x)
    cls_token = m.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat((cls_token, m.dist_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = m.pos_drop(x + m.pos_embed)
    for i in range(n_blocks):
        x = m.blocks[i](x)
        if trace is not None:
            trace.append(float(x.std()))
    x = m.norm(x)
    x = x[:, 2:, :]
    n, _, c = x.shape
    side = int(round((x.shape[1]) ** 0.5))
    return x.permute(0, 2, 1).reshape(n, c, side, side)


def cait_features(m, x, n_blocks, trace=None):
    """The reference's CaiT branch (fastflow.py), blocks 0..n_blocks-1."""
    x = m.patch_embed(x)
    x = x + m.pos_embed
    x = m.pos_drop(x)
    for i in range(n_blocks):
        x = m.blocks[i](x)
        if trace is not None:
            trace.append(float(x.std()))
    n, _, c = x.shape
    x = m.norm(x)
    side = int(round((x.shape[1]) ** 0.5))
    return x.permute(0, 2, 1).reshape(n, c, side, side)


def run(model, features, x, n_blocks, label):
    """Runs `features` in float32 and float64; returns the float64 map as float32."""
    model.eval()
    with torch.no_grad():
        y32 = features(model, x, n_blocks)
        trace = []
        model.double()
        y64 = features(model, x.double(), n_blocks, trace)
    rel = float((y32.double() - y64).abs().max() / y64.abs().max())
    print(
        f"{label}: out {tuple(y64.shape)}, max|y| {float(y64.abs().max()):.3f}, "
        f"torch f32 vs f64 max rel {rel:.2e}"
    )
    print(f"  residual std per block: {' '.join(f'{s:.3g}' for s in trace)}")
    return y64.float()


def save_small(name, model, features, n_blocks):
    fill_module(model)
    x = vit_input(f"vit_input.{name}", (2, 3, 64, 64))
    y = run(model, features, x, n_blocks, name)
    save_file({"output": y.contiguous()}, os.path.join(OUT, f"{name}.safetensors"))


def save_full(name, model, features, n_blocks, img):
    fill_module(model)
    x = vit_input(f"vit_input.{name}", (1, 3, img, img))
    y = run(model, features, x, n_blocks, name)
    flat = y.reshape(-1)
    per_channel = y[0].double().reshape(y.shape[1], -1)
    tensors = {
        "output_sub": flat[::SUB_STRIDE].contiguous(),
        "stride": torch.tensor([SUB_STRIDE], dtype=torch.int64),
        "shape": torch.tensor(list(y.shape), dtype=torch.int64),
        "channel_mean": per_channel.mean(1).float(),
        "channel_std": per_channel.std(1, unbiased=False).float(),
    }
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    small = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0, num_classes=0)

    save_small("deit_small", VisionTransformer(distilled=True, **small), deit_features, 2)
    save_small("cait_small", Cait(init_scale=1e-5, **small), cait_features, 2)

    deit = timm.create_model("deit_base_distilled_patch16_384", pretrained=False)
    # Blocks past the ones FastFlow runs never influence the features.
    deit.blocks = deit.blocks[:8]
    save_full("deit_full", deit, deit_features, 8, 384)
    del deit

    cait = timm.create_model("cait_m48_448", pretrained=False)
    cait.blocks = cait.blocks[:41]
    cait.blocks_token_only = torch.nn.ModuleList()
    save_full("cait_full", cait, cait_features, 41, 448)


if __name__ == "__main__":
    main()
