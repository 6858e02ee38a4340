"""Imports go one way, pipeline -> serving: `serving` is a standalone package (it could be
installed alone in a serving image), so importing any of its modules loads no `pipeline`
module. Checked in a fresh interpreter, where nothing else has imported the pipeline."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import serving

ROOT = Path(__file__).resolve().parents[2]


def test_importing_every_serving_module_loads_no_pipeline_module():
    modules = sorted(f"serving.{m.name}" for m in pkgutil.iter_modules(serving.__path__)
                     if m.name != "__main__")
    assert {"serving.app", "serving.cli", "serving.runner", "serving.model_dir"} <= set(modules)
    script = ("import importlib, json, sys\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "loaded = [m for m in sys.modules if m.split('.')[0] == 'pipeline']\n"
              "print(json.dumps(sorted(loaded)))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

