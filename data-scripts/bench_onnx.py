"""Time the reference FastFlow exported to ONNX under ONNX Runtime and OpenVINO
(the deployment peers of ``fastflow bench``'s inference), on the CPU.

Run from the repository root (no network):

    python data-scripts/bench_onnx.py [config] [size] [batch] [iters] [out.json] [model.onnx]

The model is the reference's as ``bench_reference.py`` builds it (timm random
init, ``torch.manual_seed(0)``), in eval mode, exported with
``torch.onnx.export`` (opset 17, dynamic batch) with the anomaly map as its
output; ``model.onnx`` is reused if it exists. Both runtimes get 2 threads and
fp32 (ONNX Runtime: all graph optimisations, ``intra_op_num_threads=2``;
OpenVINO: ``INFERENCE_NUM_THREADS=2``, ``INFERENCE_PRECISION_HINT=f32``).
Reports the best and median of ``iters`` timed runs at batch ``batch`` and 1
after one warm-up run each, and writes them as JSON to ``out.json`` if given.
Needs ``pip install onnx onnxruntime openvino`` besides the fixture set.
"""

import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reference import CONFIGS, report, throughput, timings, write_json  # noqa: E402
from make_flow_fixtures import FastFlow  # noqa: E402


class AnomalyMapOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["anomaly_map"]


def export(name, size, path):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = FastFlow(cfg["backbone_name"], cfg["flow_step"], size, cfg["conv3x3_only"], cfg["hidden_ratio"])
    model.eval()
    torch.onnx.export(
        AnomalyMapOnly(model), torch.randn(1, 3, size, size), path, opset_version=17,
        input_names=["x"], output_names=["anomaly_map"],
        dynamic_axes={"x": {0: "batch"}, "anomaly_map": {0: "batch"}},
    )


def main():
    args = sys.argv[1:]
    name = args[0] if len(args) > 0 else "resnet18"
    size = int(args[1]) if len(args) > 1 else 256
    batch = int(args[2]) if len(args) > 2 else 8
    iters = int(args[3]) if len(args) > 3 else 5
    json_out = args[4] if len(args) > 4 else None
    path = args[5] if len(args) > 5 else os.path.join(tempfile.gettempdir(), f"fastflow-{name}-{size}.onnx")
    torch.set_num_threads(2)
    if not os.path.exists(path):
        export(name, size, path)

    import onnxruntime as ort
    import openvino as ov

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    core = ov.Core()
    compiled = core.compile_model(
        path, "CPU", {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    )
    request = compiled.create_infer_request()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
    result = {"config": name, "input_size": size, "onnxruntime": {}, "openvino": {},
              "versions": {"onnxruntime": ort.__version__, "openvino": ov.__version__}}
    for b, key in ((batch, "inference"), (1, "inference_batch1")):
        xb = np.ascontiguousarray(x[:b])
        runs = {
            "onnxruntime": lambda: sess.run(None, {"x": xb}),
            "openvino": lambda: request.infer({0: xb}),
        }
        for runtime, run in runs.items():
            run()
            t = throughput(b, timings(iters, run))
            result[runtime][key] = t
            report(f"{runtime:12} inference batch {b}", t)
    write_json(json_out, result)


if __name__ == "__main__":
    main()
