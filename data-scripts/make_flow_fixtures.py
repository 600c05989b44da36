"""Write the PyTorch-reference fixtures that the ff-flow parity tests compare against.

Run from the repository root (about a minute on 2 cores, needs no network):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_flow_fixtures.py

The model is the reference's (gathierry/FastFlow ``fastflow.py``) rebuilt from
timm 0.5.4 and FrEIA 0.2 exactly as that file does: a timm
``features_only=True, out_indices=[1, 2, 3]`` CNN, trainable
``nn.LayerNorm([C, H, W])`` per scale, and per scale a FrEIA ``SequenceINN`` of
``AllInOneBlock(subnet_constructor=subnet_conv_func(k, hidden_ratio),
affine_clamping=2.0, permute_soft=False)`` with k = 3 on even steps and 1 on
odd steps unless ``conv3x3_only``. Its forward puts the feature extractor in
eval mode, as the reference does.

Every weight comes from ``detweights.fill_module`` (the twin of
``crates/ff-backbone/src/det_init.rs``): backbone tensors under their timm keys
(WITHOUT the ``feature_extractor.`` prefix, as ff-backbone names them), norms
and flows under their full reference keys. Channel permutations come from a
fixed numpy stream and are written to the fixture; the Rust tests load them as
the ``w_perm`` / ``w_perm_inv`` buffers. Inputs are closed-form too:
``4 * det_uniform("fixture.images", n)`` for images and
``3 * det_uniform(f"fixture.features.{i}", n)`` for the flow-only features.

Outputs in ``tests-fixtures/flow/`` (tensors as safetensors, statistics as JSON):

* ``<case>.json`` / ``<case>.safetensors`` for four configs (resnet18 at 64 px
  and wide_resnet50_2 at 96 px with 3x3 kernels only, resnet18 at 96 px and
  wide_resnet50_2 at 64 px with alternating kernels; batch 2; reduced ``flow_step`` and ``hidden_ratio`` to
  keep the files small). Each case has two parts:
  ``flow`` (synthetic features -> norms -> flows) and ``model`` (images ->
  backbone -> norms -> flows). Per part: ``z`` per scale and backbone features
  as statistics (sum, sum of |x|, sum of squares, 64 sampled elements), the
  log-det per scale, the loss and the anomaly map in full, and for every
  trainable tensor its gradient and its value after one ``torch.optim.Adam``
  step (lr 1e-3, weight_decay 1e-5) as statistics (16 sampled elements), small tensors in full.
* ``adam.json``: three Adam steps on two small tensors (with weight decay), to
  pin the bias corrections beyond the first step.
* ``reference_tiny.pt``: a checkpoint in the reference's own format,
  ``torch.save({"epoch", "model_state_dict", "optimizer_state_dict"})`` with a
  real Adam state after one training step, for resnet18 at 32 px, 1 flow step,
  hidden ratio 0.05. To fit the size budget its ``model_state_dict`` keeps only
  a few ``feature_extractor.*`` tensors (``conv1.weight`` and ``bn1.*``,
  including the int64 ``num_batches_tracked``); all backbone tensors are
  det_init values, which the Rust test recomputes for the ones left out.
  ``reference_tiny.json`` holds its config and the anomaly map the reference
  computes with it (after the step) for the det images.
* ``bare_state_dict.pt``: ``torch.save`` of a bare state dict (a LayerNorm's
  det_init ``norms.0.weight`` / ``norms.0.bias``), the other layout users have.
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import timm
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from detweights import det_uniform, fill_module  # noqa: E402

OUT = os.path.join("tests-fixtures", "flow")
N_SAMPLES = 64
N_PARAM_SAMPLES = 16
FULL_LIMIT = 1024  # tensors up to this many elements are stored whole


# --- The reference model (gathierry/FastFlow fastflow.py), CNN part ---------

def subnet_conv_func(kernel_size, hidden_ratio):
    def subnet_conv(in_channels, out_channels):
        hidden_channels = int(in_channels * hidden_ratio)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, out_channels, kernel_size, padding="same"),
        )

    return subnet_conv


def nf_fast_flow(input_chw, conv3x3_only, hidden_ratio, flow_steps, clamp=2.0):
    nodes = Ff.SequenceINN(*input_chw)
    for i in range(flow_steps):
        if i % 2 == 1 and not conv3x3_only:
            kernel_size = 1
        else:
            kernel_size = 3
        nodes.append(
            Fm.AllInOneBlock,
            subnet_constructor=subnet_conv_func(kernel_size, hidden_ratio),
            affine_clamping=clamp,
            permute_soft=False,
        )
    return nodes


class FastFlow(nn.Module):
    def __init__(self, backbone_name, flow_steps, input_size, conv3x3_only=False, hidden_ratio=1.0):
        super().__init__()
        self.feature_extractor = timm.create_model(
            backbone_name, pretrained=False, features_only=True, out_indices=[1, 2, 3]
        )
        channels = self.feature_extractor.feature_info.channels()
        scales = self.feature_extractor.feature_info.reduction()
        self.norms = nn.ModuleList()
        for in_channels, scale in zip(channels, scales):
            self.norms.append(
                nn.LayerNorm(
                    [in_channels, int(input_size / scale), int(input_size / scale)],
                    elementwise_affine=True,
                )
            )
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

    def forward(self, x):
        self.feature_extractor.eval()
        features = self.feature_extractor(x)
        return self.forward_features(features)

    def forward_features(self, features):
        # The tail of the reference forward, after the feature extractor.
        features = [self.norms[i](feature) for i, feature in enumerate(features)]
        loss = 0
        outputs = []
        log_dets = []
        for i, feature in enumerate(features):
            output, log_jac_dets = self.nf_flows[i](feature)
            loss += torch.mean(0.5 * torch.sum(output**2, dim=(1, 2, 3)) - log_jac_dets)
            outputs.append(output)
            log_dets.append(log_jac_dets)
        ret = {"loss": loss, "z": outputs, "log_det": log_dets}
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


# --- Deterministic construction ----------------------------------------------

def build_model(cfg, perm_seed):
    torch.manual_seed(0)
    model = FastFlow(
        cfg["backbone_name"], cfg["flow_step"], cfg["input_size"], cfg["conv3x3_only"], cfg["hidden_ratio"]
    )
    fill_module(model.feature_extractor, prefix="")
    fill_module(model.norms, prefix="norms.")
    fill_module(model.nf_flows, prefix="nf_flows.")
    rs = np.random.RandomState(perm_seed)
    perms = []
    with torch.no_grad():
        for i, flow in enumerate(model.nf_flows):
            scale_perms = []
            for k, block in enumerate(flow.module_list):
                c = block.in_channels
                p = rs.permutation(c)
                w = np.zeros((c, c), dtype=np.float32)
                w[np.arange(c), p] = 1.0
                block.w_perm.copy_(torch.from_numpy(w).view(c, c, 1, 1))
                block.w_perm_inv.copy_(torch.from_numpy(w.T.copy()).view(c, c, 1, 1))
                scale_perms.append([int(v) for v in p])
            perms.append(scale_perms)
    return model, perms


def det_tensor(key, shape, scale):
    n = int(np.prod(shape))
    return torch.from_numpy((scale * det_uniform(key, n)).astype(np.float32).reshape(shape))


def images(cfg, batch):
    s = cfg["input_size"]
    return det_tensor("fixture.images", (batch, 3, s, s), 4.0)


def synthetic_features(model, cfg, batch):
    channels = model.feature_extractor.feature_info.channels()
    scales = model.feature_extractor.feature_info.reduction()
    s = cfg["input_size"]
    return [
        det_tensor(f"fixture.features.{i}", (batch, c, s // r, s // r), 3.0)
        for i, (c, r) in enumerate(zip(channels, scales))
    ]


def f32(v):
    # Nine significant digits identify a float32 exactly.
    return float(f"{v:.9g}")


def stats(t, n_samples=N_SAMPLES):
    a = t.detach().double().numpy().reshape(-1)
    n = a.size
    rs = np.random.RandomState(n % 65521)
    idx = np.sort(rs.choice(n, size=min(n, n_samples), replace=False))
    return {
        "shape": list(t.shape),
        "sum": float(a.sum()),
        "sum_abs": float(np.abs(a).sum()),
        "sum_sq": float((a * a).sum()),
        "max_abs": float(np.abs(a).max()),
        "idx": [int(i) for i in idx],
        "values": [f32(a[i]) for i in idx],
    }


def trainable(model):
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def run_part(model, inputs, is_images):
    """One eval forward (outputs, map) and one training step (grads, params after Adam)."""
    out = {}
    tensors = {}
    model.eval()
    with torch.no_grad():
        if is_images:
            feats = model.feature_extractor(inputs)
            for i, f in enumerate(feats):
                out[f"features.{i}"] = stats(f)
            ret = model(inputs)
        else:
            ret = model.forward_features(inputs)
    for i, z in enumerate(ret["z"]):
        out[f"z.{i}"] = stats(z)
        tensors[f"log_det.{i}"] = ret["log_det"][i].contiguous()
    tensors["loss"] = ret["loss"].reshape(1)
    tensors["anomaly_map"] = ret["anomaly_map"].contiguous()

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    opt.zero_grad()
    ret_train = model(inputs) if is_images else model.forward_features(inputs)
    assert torch.equal(ret_train["loss"], ret["loss"]), "train and eval losses differ"
    ret_train["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in trainable(model)}
    opt.step()
    for k, p in trainable(model):
        out[f"grad.{k}"] = stats(grads[k], N_PARAM_SAMPLES)
        out[f"after.{k}"] = stats(p, N_PARAM_SAMPLES)
        if p.numel() <= FULL_LIMIT:
            tensors[f"after.{k}"] = p.detach().clone().contiguous()
            tensors[f"grad.{k}"] = grads[k].contiguous()
    return out, tensors


CASES = [
    ("resnet18_64_c3", dict(backbone_name="resnet18", input_size=64, flow_step=4, hidden_ratio=0.5, conv3x3_only=True)),
    ("resnet18_96_alt", dict(backbone_name="resnet18", input_size=96, flow_step=3, hidden_ratio=1.0, conv3x3_only=False)),
    ("wide_resnet50_2_64_alt", dict(backbone_name="wide_resnet50_2", input_size=64, flow_step=2, hidden_ratio=0.25, conv3x3_only=False)),
    ("wide_resnet50_2_96_c3", dict(backbone_name="wide_resnet50_2", input_size=96, flow_step=2, hidden_ratio=0.125, conv3x3_only=True)),
]
BATCH = 2


def write_case(name, cfg, perm_seed):
    doc = {"config": cfg, "batch": BATCH, "perm_seed_numpy": perm_seed}
    tensors = {}
    model, perms = build_model(cfg, perm_seed)
    doc["permutations"] = perms
    feats = synthetic_features(model, cfg, BATCH)
    part, t = run_part(model, feats, is_images=False)
    doc["flow"] = part
    tensors.update({f"flow.{k}": v for k, v in t.items()})
    model, _ = build_model(cfg, perm_seed)
    x = images(cfg, BATCH)
    doc["image_samples"] = stats(x)
    part, t = run_part(model, x, is_images=True)
    doc["model"] = part
    tensors.update({f"model.{k}": v for k, v in t.items()})
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    save_file(tensors, os.path.join(OUT, f"{name}.safetensors"))


def write_adam():
    shapes = {"a": (3, 4), "b.weight": (5,)}
    params = {k: nn.Parameter(det_tensor(f"adam.{k}", s, 2.0)) for k, s in shapes.items()}
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, weight_decay=1e-5)
    doc = {"lr": 1e-3, "weight_decay": 1e-5, "shapes": {k: list(s) for k, s in shapes.items()}, "steps": []}
    for step in range(3):
        opt.zero_grad()
        # loss = sum(p * c_t): the gradient is exactly c_t in both frameworks.
        loss = sum((p * det_tensor(f"adam.coef.{step}.{k}", p.shape, 2.0)).sum() for k, p in params.items())
        loss.backward()
        opt.step()
        doc["steps"].append({k: p.detach().reshape(-1).tolist() for k, p in params.items()})
    with open(os.path.join(OUT, "adam.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def write_reference_pt():
    cfg = dict(backbone_name="resnet18", input_size=32, flow_step=1, hidden_ratio=0.05, conv3x3_only=False)
    model, _ = build_model(cfg, 99)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = images(cfg, BATCH)
    model.train()
    opt.zero_grad()
    model(x)["loss"].backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ret = model(x)
    keep_backbone = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"}
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("feature_extractor.") or k[len("feature_extractor."):] in keep_backbone
    }
    # The reference's checkpoint call, with this trimmed state dict.
    torch.save(
        {"epoch": 1, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()},
        os.path.join(OUT, "reference_tiny.pt"),
    )
    doc = {
        "config": cfg,
        "batch": BATCH,
        "epoch": 1,
        "kept_backbone_keys": sorted(keep_backbone),
        "loss": float(ret["loss"]),
        "anomaly_map": [f32(v) for v in ret["anomaly_map"].reshape(-1).tolist()],
        "anomaly_map_shape": list(ret["anomaly_map"].shape),
    }
    with open(os.path.join(OUT, "reference_tiny.json"), "w") as f:
        json.dump(doc, f, separators=(",", ":"))


def write_bare_state_dict():
    """A .pt holding a bare state dict (``torch.save(model.state_dict())``)."""
    norm = nn.LayerNorm([2, 2, 2])
    fill_module(norm, prefix="norms.0.")
    sd = {f"norms.0.{k}": v for k, v in norm.state_dict().items()}
    torch.save(sd, os.path.join(OUT, "bare_state_dict.pt"))


def main():
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for i, (name, cfg) in enumerate(CASES):
        write_case(name, cfg, 1000 + i)
        print("wrote", name)
    write_adam()
    write_reference_pt()
    write_bare_state_dict()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"total fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
