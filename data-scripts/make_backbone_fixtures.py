"""Write the timm 0.5.4 ResNet feature fixtures that the ff-backbone CNN
parity tests (crates/ff-backbone/tests/resnet_parity.rs) compare against.

Run from the repository root (about a minute, needs no network):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_backbone_fixtures.py

The models are exactly what the FastFlow reference (gathierry/FastFlow
``fastflow.py``) builds for its CNN backbones:
``timm.create_model(name, pretrained=False, features_only=True,
out_indices=[1, 2, 3])`` in eval mode (BatchNorm with running statistics).
Every weight comes from ``detweights.fill_module`` (the twin of
``crates/ff-backbone/src/det_init.rs``) and every input from ``cnn_input``
below (``det_uniform`` scaled to [-2, 2), the range of an ImageNet-normalised
image), so only outputs are stored. The forward runs in float64 so that the
stored target is the exact value, not one float32 rounding of it.

Output: ``tests-fixtures/backbone/resnet.safetensors`` holding, per case,
``<case>.layer1``, ``<case>.layer2``, ``<case>.layer3`` (float32, full maps):

* ``resnet18_64``: resnet18, batch 2, 64 x 64;
* ``resnet18_96``: resnet18, batch 2, 96 x 96;
* ``resnet18_40x56``: resnet18, batch 2, 40 x 56 (odd feature sizes, not square);
* ``wide_resnet50_2_64``: wide_resnet50_2, batch 2, 64 x 64.

The safetensors metadata holds, for each model, ``keys.<name>``: every
floating state-dict key of the features_only model with its shape, one
``key d0xd1x...`` per line, so the Rust test can check that it asks for
exactly timm's keys. The script asserts that these keys are the plain
model's keys minus ``layer4.*`` and ``fc.*`` (so hub ``model.safetensors``
files, saved from plain models, hold all of them).
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import detweights  # noqa: E402

import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

assert timm.__version__ == "0.5.4", timm.__version__

OUT = os.path.join("tests-fixtures", "backbone", "resnet.safetensors")

CASES = [
    # (case name, timm name, batch, height, width)
    ("resnet18_64", "resnet18", 2, 64, 64),
    ("resnet18_96", "resnet18", 2, 96, 96),
    ("resnet18_40x56", "resnet18", 2, 40, 56),
    ("wide_resnet50_2_64", "wide_resnet50_2", 2, 64, 64),
]


def cnn_input(case: str, shape) -> torch.Tensor:
    """The input of `case`: 4 * det_uniform("input.<case>", n) in float32.

    The Rust test computes the same values (f64 product, one cast to f32).
    """
    n = int(np.prod(shape))
    u = detweights.det_uniform("input." + case, n)
    return torch.from_numpy((4.0 * u).astype(np.float32).reshape(shape))


def key_listing(model: torch.nn.Module) -> str:
    lines = []
    for key, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        lines.append(key + " " + "x".join(str(d) for d in t.shape))
    return "\n".join(lines)


def build(name: str) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=[1, 2, 3])
    plain = timm.create_model(name, pretrained=False)
    fo_keys = set(model.state_dict().keys())
    plain_keys = {k for k in plain.state_dict().keys() if not k.startswith(("layer4.", "fc."))}
    assert fo_keys == plain_keys, (name, sorted(fo_keys ^ plain_keys)[:10])
    detweights.fill_module(model)
    return model.eval()


def main():
    torch.manual_seed(0)
    tensors = {}
    metadata = {"script": "data-scripts/make_backbone_fixtures.py", "timm": timm.__version__}
    models = {}
    for case, name, b, h, w in CASES:
        if name not in models:
            models[name] = build(name)
            metadata["keys." + name] = key_listing(models[name])
        model = models[name]
        x = cnn_input(case, (b, 3, h, w))
        with torch.no_grad():
            feats64 = model.double()(x.double())
            feats32 = model.float()(x)
        for i, (f64, f32) in enumerate(zip(feats64, feats32), start=1):
            ref = f64.float().contiguous()
            tensors[f"{case}.layer{i}"] = ref
            rel = (f32 - ref).abs().max().item() / ref.abs().max().item()
            print(
                f"{case} layer{i} {tuple(ref.shape)} max|ref|={ref.abs().max().item():.3f} "
                f"std={ref.std().item():.3f} torch-f32 rel.err={rel:.2e}"
            )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
