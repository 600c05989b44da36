"""Time the PyTorch reference FastFlow (training step and inference) on the CPU,
next to ``fastflow bench`` (``data-scripts/bench_side_by_side.sh`` runs both).

Run from the repository root (no network; a few minutes on 2 cores):

    python data-scripts/bench_reference.py [config] [size] [batch] [iters] [out.json]

``config`` is ``resnet18`` (default), ``wide_resnet50_2``, ``deit`` or ``cait``
with the reference YAML settings (resnet18: 8 flow steps, hidden ratio 1.0,
3x3 kernels only; the transformers are timed for inference only, and their
``size`` defaults to 384 / 448).
The model is the reference's, as ``make_flow_fixtures.py`` builds it, with
timm's random init (``torch.manual_seed(0)``) and random inputs. PyTorch runs
with 2 threads (``torch.set_num_threads(2)``), the machine's cores. Reports the
best and the median of ``iters`` timings of the whole training step (forward,
backward, ``torch.optim.Adam(lr=1e-3, weight_decay=1e-5)`` step), the best of
its parts, and inference (forward + anomaly map under ``torch.no_grad()``) at
batch ``batch`` and 1; writes them as JSON to ``out.json`` if given.
"""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_flow_fixtures import FastFlow  # noqa: E402

CONFIGS = {
    "resnet18": dict(backbone_name="resnet18", flow_step=8, hidden_ratio=1.0, conv3x3_only=True),
    "wide_resnet50_2": dict(
        backbone_name="wide_resnet50_2", flow_step=8, hidden_ratio=1.0, conv3x3_only=False
    ),
    # The transformers: inference only (their training steps take minutes here).
    "deit": dict(backbone_name="deit_base_distilled_patch16_384", flow_step=20, hidden_ratio=0.16,
                 conv3x3_only=False, vit_blocks=8, size=384),
    "cait": dict(backbone_name="cait_m48_448", flow_step=20, hidden_ratio=0.16,
                 conv3x3_only=False, vit_blocks=41, size=448),
}


def build_model(name, size):
    """The reference FastFlow of config ``name`` with timm's random init."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    if "vit_blocks" in cfg:
        from make_vit_fixtures import cait_features, deit_features
        from make_vit_pt_fixtures import FastFlowTransformer

        features = deit_features if name == "deit" else cait_features
        return FastFlowTransformer(cfg["backbone_name"], cfg["vit_blocks"], features, cfg["flow_step"],
                                   size, cfg["conv3x3_only"], cfg["hidden_ratio"])
    return FastFlow(cfg["backbone_name"], cfg["flow_step"], size, cfg["conv3x3_only"], cfg["hidden_ratio"])


def timings(iters, f):
    """Seconds of each of ``iters`` calls of ``f``, sorted."""
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def best_of(iters, f):
    return timings(iters, f)[0]


def throughput(batch, secs):
    """Best and median images per second of sorted timings."""
    return {"batch_size": batch, "best_img_per_s": batch / secs[0],
            "median_img_per_s": batch / statistics.median(secs)}


def report(label, t):
    """Prints one measurement: best and median images per second."""
    print(f"{label}: best {t['best_img_per_s']:.3f} img/s | median {t['median_img_per_s']:.3f} img/s")


def measure_inference(model, x, batch, iters, result):
    """Times inference (forward + anomaly map, no_grad) at ``batch`` and 1
    after a warm-up run each, into ``result["inference"]`` and
    ``result["inference_batch1"]``."""
    model.eval()
    for b, key in ((batch, "inference"), (1, "inference_batch1")):
        xb = x[:b].contiguous()

        def infer():
            with torch.no_grad():
                return model(xb)["anomaly_map"]

        infer()
        result[key] = throughput(b, timings(iters, infer))
        report(f"inference batch {b}", result[key])


def write_json(path, result):
    """Writes ``result`` to ``path`` as JSON, if a path is given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def main():
    args = sys.argv[1:]
    name = args[0] if len(args) > 0 else "resnet18"
    cfg = CONFIGS[name]
    size = int(args[1]) if len(args) > 1 else cfg.get("size", 256)
    batch = int(args[2]) if len(args) > 2 else 8
    iters = int(args[3]) if len(args) > 3 else 3
    json_out = args[4] if len(args) > 4 else None
    torch.set_num_threads(2)
    model = build_model(name, size)
    x = torch.randn(batch, 3, size, size)
    result = {"config": name, "input_size": size, "threads": torch.get_num_threads()}
    if "vit_blocks" in cfg:
        print(f"torch {torch.__version__}, {name} @ {size} px, {iters} timed runs, 2 threads, inference only")
        measure_inference(model, x, batch, iters, result)
        write_json(json_out, result)
        return
    opt = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5
    )
    print(f"torch {torch.__version__}, {name} @ {size} px, batch {batch}, {iters} timed runs, "
          f"{torch.get_num_threads()} threads")

    model.train()

    def step():
        ret = model(x)
        opt.zero_grad()
        ret["loss"].backward()
        opt.step()

    step()  # warm-up
    secs = timings(iters, step)
    result["train"] = throughput(batch, secs)
    result["train"]["peak_rss_mib"] = peak_rss_mib()

    def backbone():
        with torch.no_grad():
            model.feature_extractor.eval()
            return model.feature_extractor(x)

    t_backbone = best_of(iters, backbone)
    t_fwd = t_bwd = t_opt = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        ret = model(x)
        t1 = time.perf_counter()
        opt.zero_grad()
        ret["loss"].backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        t_fwd, t_bwd, t_opt = min(t_fwd, t1 - t0), min(t_bwd, t2 - t1), min(t_opt, t3 - t2)
    t = result["train"]
    print(f"train step batch {batch}: best {t['best_img_per_s']:.2f} img/s | median "
          f"{t['median_img_per_s']:.2f} img/s | peak RSS {t['peak_rss_mib']:.0f} MiB")
    print(f"  backbone: {t_backbone * 1e3:8.1f} ms")
    print(f"  forward:  {t_fwd * 1e3:8.1f} ms (backbone included)")
    print(f"  backward: {t_bwd * 1e3:8.1f} ms")
    print(f"  adam:     {t_opt * 1e3:8.1f} ms")

    measure_inference(model, x, batch, iters, result)
    write_json(json_out, result)

if __name__ == "__main__":
    main()
