"""Write reference-format FastFlow checkpoints (``.pt``) with DeiT and CaiT
backbones, and the anomaly maps the reference computes with them.

Run from the repository root (about two minutes and 4 GB of memory, mostly the
full-size CaiT-M48; needs no network):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_vit_pt_fixtures.py

The model is the reference's (gathierry/FastFlow ``fastflow.py``) transformer
branch: ``timm.create_model(name, pretrained=False)`` as ``feature_extractor``
(frozen), NO ``norms`` module (the reference creates the trainable LayerNorms
only for CNN backbones and applies the transformer's own final norm instead),
one flow over ``[768, input_size // 16, input_size // 16]`` built by
``make_flow_fixtures.nf_fast_flow`` (FrEIA ``AllInOneBlock``, alternating
3x3 / 1x1 subnets), the features computed by ``make_vit_fixtures``'
``deit_features`` / ``cait_features`` (blocks 0..7 / 0..40, final norm).

Weights: ``detweights.fill_module``, backbone tensors under their timm keys
(without the ``feature_extractor.`` prefix, as ff-backbone names them), flows
under their full reference keys; permutations from a fixed numpy stream.
Blocks the reference never runs (DeiT 8..11, CaiT 41..47 and its
class-attention blocks) are dropped before filling, as make_vit_fixtures does:
they never influence the features and filling them would only cost time.

To fit the size budget the flow config is reduced (``flow_step`` 2,
``hidden_ratio`` 0.01 -> 3 hidden channels, alternating kernels; input 384 /
448 as the backbones require), and the saved ``model_state_dict`` is trimmed:

* it keeps only a few small ``feature_extractor.*`` tensors (listed in the
  JSON as ``kept_backbone_keys``); the rest are det_init values, which the
  Rust test recomputes;
* it drops the ``w_perm`` / ``w_perm_inv`` buffers (768 x 768 float32 each,
  2.4 MB apiece); the JSON lists each step's permutation (``w_perm[i, p[i]] =
  1``) and the Rust test rebuilds both matrices from it.

Everything else is the reference's own checkpoint call after one training step:
``torch.save({"epoch", "model_state_dict", "optimizer_state_dict"})`` with a
real ``torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)``
state. The expected anomaly map is computed in float64 from the float32
weights after that step, so the stored target is exact (batch 1, input
``4 * det_uniform("fixture.images", n)``). The 384 x 384 / 448 x 448 map is
stored as the flattened values at 0, stride, 2 * stride, ... plus exact sum,
sum of squares, min and max.

Outputs in ``tests-fixtures/vit_pt/``: ``deit.pt`` / ``deit.json`` and
``cait.pt`` / ``cait.json``.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detweights import fill_module  # noqa: E402
from make_flow_fixtures import det_tensor, f32, nf_fast_flow  # noqa: E402
from make_vit_fixtures import cait_features, deit_features  # noqa: E402

OUT = os.path.join("tests-fixtures", "vit_pt")
MAP_STRIDE = 37
FLOW = dict(flow_step=2, hidden_ratio=0.01, conv3x3_only=False)
CASES = [
    # name, timm name, input size, blocks the reference runs, features, kept backbone keys, perm seed
    ("deit", "deit_base_distilled_patch16_384", 384, 8, deit_features,
     ["cls_token", "dist_token", "norm.bias", "norm.weight", "patch_embed.proj.bias"], 2000),
    ("cait", "cait_m48_448", 448, 41, cait_features,
     ["blocks.0.attn.proj_l.weight", "blocks.0.gamma_1", "norm.bias", "norm.weight", "patch_embed.proj.bias"], 2001),
]


class FastFlowTransformer(nn.Module):
    """The reference FastFlow for ``BACKBONE_DEIT`` / ``BACKBONE_CAIT``."""

    def __init__(self, backbone_name, n_blocks, features, flow_steps, input_size, conv3x3_only, hidden_ratio):
        super().__init__()
        self.feature_extractor = timm.create_model(backbone_name, pretrained=False)
        # Unused blocks dropped (see the module docstring).
        self.feature_extractor.blocks = self.feature_extractor.blocks[:n_blocks]
        if hasattr(self.feature_extractor, "blocks_token_only"):
            self.feature_extractor.blocks_token_only = nn.ModuleList()
        channels = [768]
        scales = [16]
        for param in self.feature_extractor.parameters():
            param.requires_grad = False
        self.nf_flows = nn.ModuleList()
        for in_channels, scale in zip(channels, scales):
            self.nf_flows.append(
                nf_fast_flow(
                    [in_channels, int(input_size / scale), int(input_size / scale)],
                    conv3x3_only=conv3x3_only,
                    hidden_ratio=hidden_ratio,
                    flow_steps=flow_steps,
                )
            )
        self.input_size = input_size
        self.n_blocks = n_blocks
        self.features = features

    def forward(self, x):
        self.feature_extractor.eval()
        features = [self.features(self.feature_extractor, x, self.n_blocks)]
        loss = 0
        outputs = []
        for i, feature in enumerate(features):
            output, log_jac_dets = self.nf_flows[i](feature)
            loss += torch.mean(0.5 * torch.sum(output**2, dim=(1, 2, 3)) - log_jac_dets)
            outputs.append(output)
        ret = {"loss": loss}
        if not self.training:
            anomaly_map_list = []
            for output in outputs:
                log_prob = -torch.mean(output**2, dim=1, keepdim=True) * 0.5
                prob = torch.exp(log_prob)
                a_map = F.interpolate(
                    -prob, size=[self.input_size, self.input_size], mode="bilinear", align_corners=False
                )
                anomaly_map_list.append(a_map)
            anomaly_map_list = torch.stack(anomaly_map_list, dim=-1)
            ret["anomaly_map"] = torch.mean(anomaly_map_list, dim=-1)
        return ret


def build(timm_name, size, n_blocks, features, perm_seed):
    torch.manual_seed(0)
    model = FastFlowTransformer(
        timm_name, n_blocks, features, FLOW["flow_step"], size, FLOW["conv3x3_only"], FLOW["hidden_ratio"]
    )
    fill_module(model.feature_extractor, prefix="")
    fill_module(model.nf_flows, prefix="nf_flows.")
    rs = np.random.RandomState(perm_seed)
    perms = []
    with torch.no_grad():
        for flow in model.nf_flows:
            scale_perms = []
            for block in flow.module_list:
                c = block.in_channels
                p = rs.permutation(c)
                w = np.zeros((c, c), dtype=np.float32)
                w[np.arange(c), p] = 1.0
                block.w_perm.copy_(torch.from_numpy(w).view(c, c, 1, 1))
                block.w_perm_inv.copy_(torch.from_numpy(w.T.copy()).view(c, c, 1, 1))
                scale_perms.append([int(v) for v in p])
            perms.append(scale_perms)
    return model, perms


def write_case(name, timm_name, size, n_blocks, features, keep_backbone, perm_seed):
    model, perms = build(timm_name, size, n_blocks, features, perm_seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = det_tensor("fixture.images", (1, 3, size, size), 4.0)
    model.train()
    opt.zero_grad()
    model(x)["loss"].backward()
    opt.step()
    sd = model.state_dict()
    missing = [k for k in keep_backbone if f"feature_extractor.{k}" not in sd]
    assert not missing, missing
    trimmed = {
        k: v
        for k, v in sd.items()
        if (not k.startswith("feature_extractor.") or k[len("feature_extractor."):] in keep_backbone)
        and k.rsplit(".", 1)[-1] not in ("w_perm", "w_perm_inv")
    }
    torch.save(
        {"epoch": 1, "model_state_dict": trimmed, "optimizer_state_dict": opt.state_dict()},
        os.path.join(OUT, f"{name}.pt"),
    )
    # The target in float64 from the float32 weights after the step.
    model.eval()
    model.double()
    with torch.no_grad():
        ret = model(x.double())
    a = ret["anomaly_map"].reshape(-1).numpy()
    doc = {
        "config": dict(backbone_name=timm_name, input_size=size, **FLOW),
        "batch": 1,
        "epoch": 1,
        "kept_backbone_keys": sorted(keep_backbone),
        "permutations": perms,
        "loss": float(ret["loss"]),
        "anomaly_map_shape": list(ret["anomaly_map"].shape),
        "anomaly_map_stride": MAP_STRIDE,
        "anomaly_map_sub": [f32(v) for v in a[::MAP_STRIDE]],
        "anomaly_map_sum": float(a.sum()),
        "anomaly_map_sum_sq": float((a * a).sum()),
        "anomaly_map_min": float(a.min()),
        "anomaly_map_max": float(a.max()),
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"{name}: loss {doc['loss']:.6g}, map in [{doc['anomaly_map_min']:.6g}, {doc['anomaly_map_max']:.6g}]")


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for case in CASES:
        write_case(*case)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
