"""Write the PIL/torchvision fixtures that the ff-data tests compare against.

Run from the repository root (takes a few seconds, needs no network):

    OMP_NUM_THREADS=1 venv/bin/python data-scripts/make_data_fixtures.py

Outputs go to ``tests-fixtures/data/``:

* ``manifest.json``: every case (source generator parameters, operation,
  output size, expected file) plus torchvision ``ToTensor`` + ``Normalize``
  probe values.
* ``resize/*.png``: PIL's resized uint8 output for procedural source images.
  The sources are *not* stored: ``pattern()`` and ``mask_pattern()`` below use
  integer arithmetic only and are reimplemented bit for bit in
  ``crates/ff-data/tests/pil_parity.rs``, which keeps the fixtures small.
* ``modes/``: small source files in the modes users bring (grayscale,
  grayscale+alpha, RGBA, palette, 16-bit RGB, 16-bit grayscale, JPEG, CMYK
  JPEG) and
  what PIL's ``Image.open(f).convert("RGB")`` followed by torchvision
  ``Resize(32)`` makes of them.

Operations are exactly the reference's torchvision calls on PIL images:
``Resize(int)`` (shorter side, PIL bilinear with antialias) and
``Resize((s, s))`` (both sides), the rule ff-data uses for model input.
"""

import json
import os
import struct
import zlib

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests-fixtures", "data")
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def noise(x, y, seed):
    """Integer hash noise in [-24, 24]; mirrored in pil_parity.rs."""
    v = (x * 73856093) ^ (y * 19349663) ^ (seed * 83492791)
    v = (v & 0xFFFFFFFF).astype(np.uint64)
    v = (v * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    v = v ^ (v >> np.uint64(15))
    return ((v >> np.uint64(8)) % np.uint64(49)).astype(np.int64) - 24


def pattern(w, h, seed):
    """Procedural RGB test image of size w x h (uint8, HWC).

    Smooth gradients, a high-contrast checkerboard (hard edges), a disc,
    one-pixel black lines (aliasing) and a hash-noise quadrant.
    """
    y = np.arange(h, dtype=np.int64)[:, None] + np.zeros((1, w), dtype=np.int64)
    x = np.arange(w, dtype=np.int64)[None, :] + np.zeros((h, 1), dtype=np.int64)
    r = (x * 255) // max(w - 1, 1)
    g = (y * 255) // max(h - 1, 1)
    b = 255 - ((x + y) * 255) // max(w + h - 2, 1)
    img = np.stack([r, g, b], axis=-1)
    # Checkerboard of 37-px cells in the top-left quadrant.
    tl = (2 * x < w) & (2 * y < h)
    cell = ((x // 37) + (y // 37)) % 2
    chk = np.where(cell == 1, 230, 25)
    for c in range(3):
        img[..., c] = np.where(tl, chk, img[..., c])
    # A disc in the top-right quadrant.
    rad = min(w, h) // 6
    disc = (4 * x - 3 * w) ** 2 + (4 * y - h) ** 2 < (4 * rad) ** 2
    for c, v in enumerate([250, 40, 120]):
        img[..., c] = np.where(disc, v, img[..., c])
    # One-pixel black lines every 11 columns in the bottom-left quadrant.
    bl = (2 * x < w) & (2 * y >= h) & (x % 11 == 0)
    for c in range(3):
        img[..., c] = np.where(bl, 0, img[..., c])
    # Hash noise in the bottom-right quadrant.
    br = (2 * x >= w) & (2 * y >= h)
    for c in range(3):
        img[..., c] = np.where(br, img[..., c] + noise(x, y, seed * 3 + c), img[..., c])
    return np.clip(img, 0, 255).astype(np.uint8)


def mask_pattern(w, h):
    """Procedural binary mask (0/255, uint8, HW): an ellipse, a 2-px line, a 3x3 speck."""
    y = np.arange(h, dtype=np.int64)[:, None] + np.zeros((1, w), dtype=np.int64)
    x = np.arange(w, dtype=np.int64)[None, :] + np.zeros((h, 1), dtype=np.int64)
    ell = (3 * (2 * x - w)) ** 2 + (5 * (2 * y - h)) ** 2 < (w * 3 // 2) ** 2 // 4
    line = (y >= h // 5) & (y < h // 5 + 2) & (x >= w // 8) & (x < w * 7 // 8)
    speck = (x >= w - 40) & (x < w - 37) & (y >= h - 40) & (y < h - 37)
    return np.where(ell | line | speck, 255, 0).astype(np.uint8)


def save_png(arr, path):
    Image.fromarray(arr).save(path, optimize=True)


def write_png16_rgb(arr16, path):
    """Write a 16-bit RGB PNG by hand (PIL cannot write that mode)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        c = struct.pack(">I", len(data)) + tag + data
        return c + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def probe(t):
    """A few values of a CHW tensor for the Rust test: indices and values."""
    flat = t.reshape(-1)
    n = flat.numel()
    idx = sorted(set([0, 1, n // 7, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1] + list(range(0, n, max(n // 97, 1)))))
    return {"shape": list(t.shape), "index": idx, "value": [float(flat[i]) for i in idx],
            "channel_sum": [float(t[c].double().sum()) for c in range(t.shape[0])]}


def main():
    os.makedirs(os.path.join(OUT, "resize"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "modes"), exist_ok=True)
    cases = []

    def case(name, w, h, seed, op, size):
        src = Image.fromarray(pattern(w, h, seed))
        if op == "shorter_side":
            out = transforms.Resize(size)(src)
        else:
            out = transforms.Resize((size, size))(src)
        fname = f"resize/{name}.png"
        save_png(np.asarray(out), os.path.join(OUT, fname))
        cases.append({"name": name, "kind": "rgb", "width": w, "height": h, "seed": seed, "op": op,
                      "size": size, "out_width": out.size[0], "out_height": out.size[1], "expected": fname})

    case("rgb_1024_to_256", 1024, 1024, 1, "both_sides", 256)
    case("rgb_900_to_256", 900, 900, 2, "both_sides", 256)
    case("rgb_700x500_shorter_256", 700, 500, 3, "shorter_side", 256)
    case("rgb_700x500_both_256", 700, 500, 3, "both_sides", 256)
    case("rgb_256_to_448", 256, 256, 4, "both_sides", 448)
    case("rgb_333x517_shorter_64", 333, 517, 5, "shorter_side", 64)

    masks = []
    for (w, h, size) in [(900, 900, 256), (1024, 1024, 256), (256, 256, 448)]:
        src = Image.fromarray(mask_pattern(w, h), mode="L")
        out = np.asarray(transforms.Resize((size, size))(src))
        fname = f"resize/mask_{w}x{h}_to_{size}.png"
        save_png(out, os.path.join(OUT, fname))
        masks.append({"width": w, "height": h, "size": size, "expected": fname})

    # The whole reference pipeline on one image, for the normalisation step.
    tf = transforms.Compose([transforms.Resize((256, 256)), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    pipe = probe(tf(Image.fromarray(pattern(700, 500, 3))))
    pipe.update({"width": 700, "height": 500, "seed": 3, "size": 256})

    # Input modes: small stored sources, PIL convert("RGB") then Resize(32).
    base = pattern(64, 48, 9)
    gray = np.asarray(Image.fromarray(base).convert("L"))
    modes = []

    def mode_case(name, fname, save, pil_convert=True, tol=1):
        path = os.path.join(OUT, "modes", fname)
        save(path)
        if pil_convert:
            out = transforms.Resize(32)(Image.open(path).convert("RGB"))
            exp = np.asarray(out)
        else:
            exp = None
        return path, exp

    def add(name, fname, save, tol, note, expected_fn=None):
        path = os.path.join(OUT, "modes", fname)
        save(path)
        if expected_fn is None:
            exp = np.asarray(transforms.Resize(32)(Image.open(path).convert("RGB")))
        else:
            exp = expected_fn()
        ename = f"modes/expected_{name}.png"
        save_png(exp, os.path.join(OUT, ename))
        modes.append({"name": name, "source": f"modes/{fname}", "expected": ename, "tolerance": tol,
                      "note": note})

    add("gray", "gray.png", lambda p: Image.fromarray(gray, mode="L").save(p), 1, "8-bit grayscale")
    alpha = (np.arange(64)[None, :] * 4 + np.zeros((48, 1), dtype=np.int64)).astype(np.uint8)
    add("gray_alpha", "gray_alpha.png",
        lambda p: Image.fromarray(np.stack([gray, alpha], -1), mode="LA").save(p), 1,
        "grayscale + alpha: alpha dropped")
    add("rgba", "rgba.png",
        lambda p: Image.fromarray(np.concatenate([base, alpha[..., None]], -1), mode="RGBA").save(p), 1,
        "RGBA: alpha dropped, no compositing (as PIL convert)")
    add("palette", "palette.png",
        lambda p: Image.fromarray(base).quantize(colors=16, method=Image.Quantize.MEDIANCUT).save(p), 1,
        "8-bit palette")
    # 16-bit RGB: PIL keeps the high byte, Rust rounds v/257; they differ by at most 1.
    base16 = base.astype(np.uint16) * 257 + (np.arange(64, dtype=np.uint16)[None, :, None] % 200)
    add("rgb16", "rgb16.png", lambda p: write_png16_rgb(base16, p), 1, "16-bit RGB")

    # 16-bit grayscale: PIL's convert("RGB") clips I;16 values at 255 (almost
    # everything turns white), so the expected output is the documented
    # ff-data rule instead: v * 255 / 65535 rounded, replicated to RGB.
    gray16 = gray.astype(np.uint16) * 257

    def gray16_expected():
        g8 = ((gray16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return np.asarray(transforms.Resize(32)(Image.fromarray(g8, mode="L").convert("RGB")))

    add("gray16", "gray16.png", lambda p: Image.fromarray(gray16).save(p), 1,
        "16-bit grayscale: scaled to 8 bits (PIL would clip at 255)", gray16_expected)
    # JPEG decoders differ (libjpeg-turbo in PIL, zune-jpeg in Rust): chroma
    # upsampling and IDCT rounding, hence a looser tolerance.
    add("jpeg", "rgb.jpg", lambda p: Image.fromarray(base).save(p, quality=92), 6,
        "JPEG 4:2:0 (decoder differences)")

    # CMYK JPEG (print workflows, some camera software): Pillow writes Adobe
    # inverted CMYK; its convert("RGB") is R = 255 - min(255, C + K) etc.
    add("cmyk_jpeg", "cmyk.jpg", lambda p: Image.fromarray(base).convert("CMYK").save(p, quality=92),
        6, "CMYK JPEG (Adobe inverted; decoder differences as for JPEG)")

    manifest = {"generator": "data-scripts/make_data_fixtures.py", "mean": MEAN, "std": STD,
                "resize": cases, "masks": masks, "pipeline": pipe, "modes": modes,
                "torch": torch.__version__, "pillow": Image.__version__}
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT}: {total / 1e6:.3f} MB")


if __name__ == "__main__":
    main()
