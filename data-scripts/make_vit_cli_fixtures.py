"""Reference scores and metrics for the ViT command-line test
(``crates/ff-cli/tests/vit_cli.rs``): what the reference computes with the
``tests-fixtures/vit_pt/`` checkpoints on a small synthetic category.

The category is ff-data's synthetic generator's (Python does not reimplement
it): make it first, then run this from the repository root (about three
minutes, mostly CaiT-M48; no network):

    cargo run -p xtask -- synth --out /tmp/vit_cli --categories tiny --size 32 \\
        --seed 6 --n-train 1 --n-test-good 2 --n-test-defect 2
    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_vit_cli_fixtures.py /tmp/vit_cli/tiny
    python3 data-scripts/fixture_provenance.py

For each of DeiT and CaiT: the reference model of ``make_vit_pt_fixtures``
(det_init backbone, reduced flow, the same permutations) with the flow
weights of ``tests-fixtures/vit_pt/<name>.pt`` loaded, in eval mode, in
float64 (the stored targets are exact for the float32 weights). Every test
image goes through the reference's transform (``Resize(input_size)``,
``ToTensor``, ImageNet ``Normalize``); its score is the maximum of its
anomaly map; masks take the same ``Resize`` and ``ToTensor() > 0.5`` (the
reference's dataset). Image AUROC over the scores and pixel AUROC over
every map value are scikit-learn's ``roc_auc_score``.

Output: ``tests-fixtures/vit_cli/<name>.json`` with each image's relative
path, SHA-256 (the Rust test first checks it generated the same files),
label and score, and both AUROCs.
"""

import hashlib
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_vit_pt_fixtures import CASES, build  # noqa: E402

OUT = os.path.join("tests-fixtures", "vit_cli")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def test_images(root):
    """(relative path, label, mask path or None) of every test image, sorted."""
    out = []
    test = os.path.join(root, "test")
    for defect in sorted(os.listdir(test)):
        for name in sorted(os.listdir(os.path.join(test, defect))):
            rel = f"test/{defect}/{name}"
            if defect == "good":
                out.append((rel, 0, None))
            else:
                stem = os.path.splitext(name)[0]
                out.append((rel, 1, os.path.join(root, "ground_truth", defect, f"{stem}_mask.png")))
    return out


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_case(root, name, timm_name, size, n_blocks, features, _keep, perm_seed):
    model, _ = build(timm_name, size, n_blocks, features, perm_seed)
    path = os.path.join("tests-fixtures", "vit_pt", f"{name}.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(ckpt["model_state_dict"], strict=False)
    assert not unexpected, unexpected
    # What the checkpoint leaves out is the det_init backbone and the
    # permutations, both of which `build` made exactly as the fixture had them.
    assert all(k.startswith("feature_extractor.") or k.endswith(("w_perm", "w_perm_inv")) for k in missing)
    model.eval()
    model.double()
    image_tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    mask_tf = T.Compose([T.Resize(size), T.ToTensor()])
    images, labels, scores, maps, masks = [], [], [], [], []
    for rel, label, mask_path in test_images(root):
        path = os.path.join(root, rel)
        x = image_tf(Image.open(path).convert("RGB")).unsqueeze(0).double()
        with torch.no_grad():
            a = model(x)["anomaly_map"][0, 0].numpy()
        if mask_path is None:
            m = np.zeros((size, size), dtype=bool)
        else:
            m = (mask_tf(Image.open(mask_path).convert("L"))[0] > 0.5).numpy()
        score = float(a.max())
        images.append({"path": rel, "sha256": sha256(path), "label": label, "score": score})
        labels.append(label)
        scores.append(score)
        maps.append(a.reshape(-1))
        masks.append(m.reshape(-1))
    doc = {
        "config": {"backbone_name": timm_name, "input_size": size},
        "images": images,
        "image_auroc": float(roc_auc_score(labels, scores)),
        "pixel_auroc": float(roc_auc_score(np.concatenate(masks), np.concatenate(maps))),
    }
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{name}: scores {scores}, image AUROC {doc['image_auroc']}, pixel AUROC {doc['pixel_auroc']:.6f}")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(OUT, exist_ok=True)
    for case in CASES:
        write_case(sys.argv[1], *case)


if __name__ == "__main__":
    main()
