"""Closed-form deterministic weights: the Python twin of
crates/ff-backbone/src/det_init.rs. Change both or neither.

Fixtures use these instead of shipping full weights: both sides compute every
tensor from its state-dict key and shape.
"""
import math

import numpy as np
import torch


def fnv1a32(key: str) -> int:
    h = 0x811C9DC5
    for b in key.encode("utf-8"):
        h ^= b
        h = (h * 0x01000193) % (1 << 32)
    return h


def det_uniform(key: str, n: int) -> np.ndarray:
    h = np.uint64(fnv1a32(key))
    i = np.arange(n, dtype=np.uint64)
    raw = (h + i * np.uint64(0x9E3779B9)) % np.uint64(1 << 32)
    return raw.astype(np.float64) / 4294967296.0 - 0.5


def global_scale_init() -> float:
    return 2.0 * math.log(math.exp(5.0) - 1.0)


def det_value(key: str, shape) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    u = det_uniform(key, n)
    last = key.rsplit(".", 1)[-1]
    if last == "running_var":
        v = 1.0 + 0.5 * u
    elif last == "running_mean":
        v = 0.2 * u
    elif last == "global_scale":
        v = global_scale_init() + 0.5 * u
    elif len(shape) >= 2 and last == "weight":
        fan_in = int(np.prod(shape[1:]))
        v = 2.0 * u * math.sqrt(6.0 / max(fan_in, 1))
    elif len(shape) == 1 and last == "weight":
        v = 1.0 + 0.2 * u
    else:
        v = 0.1 * u
    return v.astype(np.float32).reshape(shape)


def fill_module(module: torch.nn.Module, prefix: str = "", skip=("num_batches_tracked", "w_perm", "w_perm_inv")):
    """Overwrite every floating tensor of `module.state_dict()` with det_value(prefix + key)."""
    sd = module.state_dict()
    with torch.no_grad():
        for key, t in sd.items():
            if key.rsplit(".", 1)[-1] in skip or not t.is_floating_point():
                continue
            t.copy_(torch.from_numpy(det_value(prefix + key, t.shape)))


if __name__ == "__main__":
    # Self-check against the FNV-1a published vectors.
    assert fnv1a32("") == 0x811C9DC5 and fnv1a32("a") == 0xE40C292C and fnv1a32("foobar") == 0xBF9CF968
    print(det_value("conv1.weight", (2, 3))[0])
