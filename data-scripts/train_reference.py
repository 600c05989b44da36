"""Time the reference's whole training loop (gathierry/FastFlow ``main.py``
``train``) on an MVTec-layout category, for the end-to-end comparison with
``fastflow train`` (``data-scripts/train_side_by_side.sh`` runs both).

Run from the repository root (no network):

    python data-scripts/train_reference.py CONFIG DATA CATEGORY EPOCHS [BATCH] [OUT.json] [WORKERS]

``CONFIG`` is ``resnet18``, ``wide_resnet50_2``, ``deit`` or ``cait`` with the
reference YAML settings (``bench_reference.py`` builds the same models, timm's
random init). The loop is ``main.py``'s: ``MVTecDataset`` transforms
(``Resize(input_size)``, ``ToTensor``, ``Normalize`` with the ImageNet
statistics; masks ``Resize`` + ``ToTensor``), a ``DataLoader`` with
``shuffle=True, num_workers=workers, drop_last=True`` for training and
``shuffle=False, num_workers=4`` for testing (``WORKERS`` changes the 4), ``torch.optim.Adam(lr=1e-3,
weight_decay=1e-5)``, an evaluation (pixel ROC AUC over all test pixels, the
``ignite`` metric, here scikit-learn's) and a ``torch.save`` checkpoint every
10 epochs (``EVAL_INTERVAL``, ``CHECKPOINT_INTERVAL``) and after the last
epoch when it is not one of those. ``BATCH`` defaults to the reference's 32
(fewer training images than that: one batch of all of them). PyTorch runs
with 2 threads, the machine's cores. Prints and writes (``OUT.json``) the
loop's wall time (first epoch to last evaluation, data loading included),
the images trained per second and the peak RSS.
"""

import glob
import json
import os
import resource
import sys
import tempfile
import time

import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reference import CONFIGS, build_model  # noqa: E402

EVAL_INTERVAL = 10
CHECKPOINT_INTERVAL = 10
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class MVTecDataset(torch.utils.data.Dataset):
    """gathierry/FastFlow ``dataset.py``: training images, or test images with
    their masks (zeros for good ones)."""

    def __init__(self, root, category, input_size, is_train):
        self.image_transform = transforms.Compose(
            [transforms.Resize(input_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )
        if is_train:
            self.image_files = sorted(glob.glob(os.path.join(root, category, "train", "good", "*.png")))
        else:
            self.image_files = sorted(glob.glob(os.path.join(root, category, "test", "*", "*.png")))
            self.target_transform = transforms.Compose([transforms.Resize(input_size), transforms.ToTensor()])
        self.is_train = is_train
        self.input_size = input_size

    def __getitem__(self, index):
        image_file = self.image_files[index]
        image = self.image_transform(Image.open(image_file).convert("RGB"))
        if self.is_train:
            return image
        if os.path.dirname(image_file).endswith("good"):
            target = torch.zeros([1, image.shape[-2], image.shape[-1]])
        else:
            target = Image.open(
                image_file.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            )
            target = self.target_transform(target)
        return image, target

    def __len__(self):
        return len(self.image_files)


def eval_once(loader, model):
    model.eval()
    outputs, targets = [], []
    for data, target in loader:
        with torch.no_grad():
            ret = model(data)
        outputs.append(ret["anomaly_map"].cpu().detach().flatten())
        targets.append(target.flatten())
    outputs = torch.cat(outputs).numpy()
    targets = (torch.cat(targets) > 0.5).numpy()
    return roc_auc_score(targets, outputs)


def main():
    args = sys.argv[1:]
    if len(args) < 4:
        sys.exit(__doc__)
    name, root, category, epochs = args[0], args[1], args[2], int(args[3])
    batch = int(args[4]) if len(args) > 4 else 32
    out = args[5] if len(args) > 5 and args[5] else None
    workers = int(args[6]) if len(args) > 6 else 4
    size = CONFIGS[name].get("size", 256)
    torch.set_num_threads(2)
    model = build_model(name, size)
    train_set = MVTecDataset(root, category, size, True)
    test_set = MVTecDataset(root, category, size, False)
    batch = min(batch, len(train_set))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=batch, shuffle=False, num_workers=workers)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5
    )
    ckpt_dir = tempfile.mkdtemp(prefix="fastflow-reference-")
    print(f"torch {torch.__version__}, {name} @ {size} px, {len(train_set)} training and "
          f"{len(test_set)} test images, batch {batch}, {epochs} epochs, 2 threads, {workers} data workers")
    trained = 0
    aurocs = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        t_epoch = time.perf_counter()
        for data in train_loader:
            ret = model(data)
            loss = ret["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained += data.shape[0]
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.perf_counter() - t_epoch:.1f} s",
              flush=True)
        last = epoch + 1 == epochs
        if (epoch + 1) % EVAL_INTERVAL == 0 or last:
            aurocs.append(eval_once(test_loader, model))
            print(f"  pixel AUROC {aurocs[-1]:.4f}", flush=True)
        if (epoch + 1) % CHECKPOINT_INTERVAL == 0 or last:
            torch.save({"epoch": epoch, "model_state_dict": model.state_dict(),
                        "optimizer_state_dict": optimizer.state_dict()},
                       os.path.join(ckpt_dir, f"{epoch}.pt"))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    result = {"config": name, "input_size": size, "epochs": epochs, "batch_size": batch, "workers": workers,
              "train_images": len(train_set), "test_images": len(test_set),
              "loop_seconds": wall, "trained_img_per_s": trained / wall,
              "peak_rss_mib": peak, "peak_rss_worker_mib": peak_children,
              "pixel_auroc": aurocs[-1]}
    print(f"reference training loop: {wall:.1f} s for {epochs} epochs ({trained / wall:.2f} img/s "
          f"trained), peak RSS {peak:.0f} MiB (data workers {peak_children:.0f} MiB)")
    for f in glob.glob(os.path.join(ckpt_dir, "*.pt")):
        os.remove(f)
    os.rmdir(ckpt_dir)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
