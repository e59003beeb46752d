"""A short soak (tests/reliability/soak.py, 16 GRPO steps): no process or file-handle leak, every
checkpoint loadable. The 300-step run is a documented command (README.md)."""

import importlib.util
from pathlib import Path

import pytest
import ray

pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.long]

_spec = importlib.util.spec_from_file_location("reliability_soak", Path(__file__).with_name("soak.py"))
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_short_soak_no_leaks_checkpoints_load(ray_local, tmp_path):
    r = soak.soak(16, tmp_path / "soak", sample_every=4, checkpoint_every=4, warmup=4)
    assert [c["step"] for c in r["checkpoints"]] == [4, 8, 12, 16] and all(c["ok"] for c in r["checkpoints"])
    assert r["leaks"]["actors_alive_after_close"] == []               # learner and workers stopped
    assert r["leaks"]["driver_children_after_close"] == []            # reward pool workers reaped
    assert r["leaks"]["driver_files_after"] <= r["leaks"]["driver_files_before"]   # files, pipes closed
    steps = [s["step"] for s in r["samples"]]
    assert steps[0] == 0 and steps[-1] == 16 and len(steps) >= 3
    g = r["growth"]
    # within the run: no steady growth of open files or processes (a leak per step would show 8+)
    assert g["driver_children"] == 0
    assert g["driver_fds"] <= 2 and g["learner_fds"] <= 2 and max(g["worker_fds"]) <= 2, g
    assert (tmp_path / "soak" / "soak_report.json").is_file()
