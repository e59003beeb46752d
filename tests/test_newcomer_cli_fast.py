"""`bitmamba COMMAND --help` and argument errors answer before torch, Ray or DeepSpeed load (the
heavy imports take seconds; the router parses with the torch-free parsers of `rl.args` first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "ray", "transformers", "datasets")
PROBE = """
import json, sys
from rl.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("PROBE " + json.dumps({"rc": rc, "loaded": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _probe(*argv: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next(x for x in r.stdout.splitlines() if x.startswith("PROBE "))
    return {**json.loads(line[len("PROBE "):]), "out": r.stdout, "err": r.stderr}


@pytest.mark.parametrize("cmd", ["grpo", "pretrain", "sft", "distill", "generate", "info", "demo", "eval", "convert"])
def test_help_loads_no_heavy_module(cmd):
    got = _probe(cmd, "--help")
    assert got["rc"] == 0 and f"bitmamba {cmd}" in got["out"]
    assert got["loaded"] == [], got["loaded"]


@pytest.mark.parametrize("argv", [["grpo"], ["sft", "--config", "x.yaml", "--bogus"], ["generate", "d"]])
def test_argument_errors_load_no_heavy_module(argv):
    got = _probe(*argv)
    assert got["rc"] == 2 and "error:" in got["err"]
    assert got["loaded"] == []
