import os
import sys
from pathlib import Path

import pytest

# Interpret or compile, decided once for the whole test process before any kernel module is imported:
# Triton kernels run compiled on a CUDA machine and under the interpreter (CPU tensors) elsewhere. No test
# module sets TRITON_INTERPRET itself (a module setting it at import would make every later GPU test of the
# same process interpret).
import torch  # noqa: E402

os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

# mamba-ssm's Triton SSD kernels autotune over ~10 configs per kernel and shape (minutes per test on an
# H100); its deterministic mode picks one config. Tests check numerics, not speed.
os.environ.setdefault("MAMBA_DETERMINISTIC", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# small test inputs kept in the repository (e.g. bitmamba2/: the BitMamba-2 C++ engine's outputs)
FIXTURES = ROOT / "tests" / "fixtures"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_user_ray_cluster(monkeypatch):
    """Tests never attach to a Ray cluster they did not start: a RAY_ADDRESS from the user's shell
    (or a `ray job submit` environment) would send local runs to it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
