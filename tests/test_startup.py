"""A scan imports what it computes with and nothing else: not open_clip, torchvision or scikit-learn, whose
versions the summary records from package metadata."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cfbd_fast.importers import from_npy

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("open_clip", "torchvision", "sklearn")

_PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules))))
sys.argv = ["cfbd-fast"] + {args!r}
from cfbd_fast.cli.main import main
main()
"""


def _run(args: list[str]) -> list[str]:
    code = _PROBE.format(heavy=HEAVY, args=args)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("MODULES "))
    return json.loads(line[len("MODULES "):])


def test_scan_imports_neither_open_clip_torchvision_nor_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((400, 16)).astype(np.float32)
    text = image + rng.standard_normal((400, 16)).astype(np.float32)
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "t.npy", text)
    from_npy(tmp_path / "i.npy", tmp_path / "t.npy", tmp_path / "s.cfbd", progress=False).close()
    assert _run(["scan", str(tmp_path / "s.cfbd"), "--mapper", "self", "--out", str(tmp_path / "scan"),
                 "--quiet"]) == []
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    versions = json.dumps(summary)
    assert all(name in versions for name in ("open_clip", "sklearn", "torch"))  # still recorded, from metadata
    # the probe sees imports: `env` reports versions without importing them either
    assert _run(["env", "--json"]) == []
