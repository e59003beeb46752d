"""Local runs and other Ray clusters on the same machine leave each other alone.

Without an address the driver starts its own private Ray instance even while another cluster (the
README's `ray start --head`) runs; with an address (`workers.cluster_address` or RAY_ADDRESS) it connects
without resource arguments. The second cluster is started here on loopback, with its own RAY_TMPDIR so
that no other process on the machine can find it, and only its processes are stopped, by PID.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from private_ray import free_port, pids_of, stop

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "grpo_tiny.yaml"
RAY = Path(sys.executable).with_name("ray")

PROBE = """
import json, sys, ray
from rl.grpo.driver import connect_ray
from rl.grpo.config import load_grpo_config
cfg = load_grpo_config(sys.argv[1], sys.argv[2:])
owns = connect_ray(cfg)
print("PROBE " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "owns": owns,
                             "cpus": ray.cluster_resources().get("CPU")}))
ray.shutdown()
"""


@pytest.fixture
def other_cluster():
    """A `ray start --head` cluster on 127.0.0.1 that this test owns: (gcs address, env that finds it)."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")      # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # token auth off on this loopback-only cluster, as the README's recipe does (Ray 2.60 clients send the
    # token only with RAY_AUTH_MODE=token); what is tested here is which cluster the driver joins
    env.update(RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    port = free_port()
    try:
        subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        assert pids_of(tmp), "ray start left no process behind"
        yield f"127.0.0.1:{port}", env
    finally:
        for _ in range(3):                                 # workers may still be starting: sweep again
            stop(pids_of(tmp))
            time.sleep(0.5)
        assert not pids_of(tmp)
        subprocess.run(["rm", "-rf", tmp], check=False)


def _probe(env: dict, *overrides: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(CONFIG), *overrides], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.mark.long
@pytest.mark.slow
def test_driver_starts_its_own_ray_beside_another_cluster_and_connects_when_told(other_cluster):
    address, env = other_cluster
    own = _probe(env)                                       # no address: a private local instance
    port = address.rsplit(":", 1)[1]                        # Ray may report the node's other IP
    assert own["owns"] and not own["gcs"].endswith(":" + port)
    assert own["cpus"] >= 2                                  # the resources we asked for, not the other's 1
    told = _probe(env, f"workers.cluster_address={address}")  # an address: connect, no resource arguments
    assert told["gcs"].endswith(":" + port) and told["cpus"] == 1
    by_env = _probe({**env, "RAY_ADDRESS": address})
    assert by_env["gcs"].endswith(":" + port)


def _ray_init_calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"):
            yield node


def test_tests_start_their_own_ray_never_attach_to_a_running_one():
    """Every `ray.init` in the tests asks for a new local instance (address="local"): a cluster the
    user runs on the machine is never joined (nor given our resource arguments)."""
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for call in _ray_init_calls(path):
            kw = {k.arg: k.value for k in call.keywords}
            addr = kw.get("address")
            if not (isinstance(addr, ast.Constant) and addr.value == "local"):
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert not bad, f"ray.init without address='local': {bad}"


def test_local_ray_kwargs_ask_for_a_new_local_instance():
    from rl.grpo.driver import local_ray_kwargs
    from rl.grpo.config import load_grpo_config

    assert local_ray_kwargs(load_grpo_config(CONFIG))["address"] == "local"


def test_tests_never_see_a_users_ray_address():
    assert "RAY_ADDRESS" not in os.environ
