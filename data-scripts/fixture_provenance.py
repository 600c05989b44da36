"""Records where every committed test fixture comes from.

Writes ``tests-fixtures/PROVENANCE.json``: for each file under
``tests-fixtures/``, the script that made it, the pinned versions of the
Python packages that script uses (from ``data-scripts/requirements.txt``,
the environment the fixtures are made in) and the file's SHA-256. Run it
after any ``make_*_fixtures.py``:

    python3 data-scripts/fixture_provenance.py

``xtask/tests/fixtures.rs`` fails when a fixture is missing from the record
or its bytes no longer match it, so a fixture regenerated (or added)
without recording it does not pass CI. Standard library only.
"""

import ast
import hashlib
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests-fixtures")
OUT = os.path.join(FIXTURES, "PROVENANCE.json")

# Which script writes each fixture folder (see each script's docstring).
SCRIPTS = {
    "backbone": "data-scripts/make_backbone_fixtures.py",
    "data": "data-scripts/make_data_fixtures.py",
    "flow": "data-scripts/make_flow_fixtures.py",
    "metrics": "data-scripts/make_metrics_fixtures.py",
    "vit": "data-scripts/make_vit_fixtures.py",
    "vit_pt": "data-scripts/make_vit_pt_fixtures.py",
    "vit_cli": "data-scripts/make_vit_cli_fixtures.py",
}

# Import names of the pinned distributions.
DISTRIBUTIONS = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "FrEIA": "FrEIA",
    "sklearn": "scikit-learn",
    "scipy": "scipy",
    "PIL": "Pillow",
    "safetensors": "safetensors",
    "numpy": "numpy",
}


def pins():
    out = {}
    with open(os.path.join(ROOT, "data-scripts", "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                out[name.strip()] = version.strip()
    return out


def imported(script, seen=None):
    """Top-level modules `script` imports, following the repo's own helpers."""
    seen = set() if seen is None else seen
    path = os.path.join(ROOT, script)
    if path in seen:
        return set()
    seen.add(path)
    with open(path) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    for name in list(names):
        local = os.path.join("data-scripts", name + ".py")
        if os.path.isfile(os.path.join(ROOT, local)):
            names |= imported(local, seen)
    return names


def main():
    pinned = pins()
    files = {}
    for dirpath, _, names in os.walk(FIXTURES):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, FIXTURES).replace(os.sep, "/")
            if rel == "PROVENANCE.json":
                continue
            folder = rel.split("/")[0]
            if folder not in SCRIPTS:
                sys.exit(f"no script is known to make {rel}; add its folder to SCRIPTS")
            script = SCRIPTS[folder]
            packages = {
                DISTRIBUTIONS[m]: pinned[DISTRIBUTIONS[m]]
                for m in sorted(imported(script))
                if m in DISTRIBUTIONS
            }
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            files[rel] = {"script": script, "packages": packages, "sha256": digest}
    record = {
        "note": "Written by data-scripts/fixture_provenance.py: the script and pinned "
        "package versions behind each fixture; checked by xtask/tests/fixtures.rs.",
        "files": dict(sorted(files.items())),
    }
    with open(OUT, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"recorded {len(files)} fixtures in {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
