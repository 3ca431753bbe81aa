"""Data-parallel training on 8 simulated CPU devices gives the one-device result.

The CPU backend's device count is fixed when JAX starts (and this process started it long
ago), so the runs take place in one child interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (tests/_sharding_child.py). For every
method it takes a few steps twice: on one device, and with the batch sharded along the "data"
axis of a mesh of the 8 devices while params and optimizer state are replicated. The tests
below read its results, one method each.
"""

from __future__ import annotations

import json

import pytest

from tests._child_process import child_env, once_per_session, run_module
from tests._sharding_child import FACTOR_SHARDED
from tests.method_cases import CASES

IDS = [c.name for c in CASES]
RTOL = 1e-5  # float32: the shards' partial sums are added in another order


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    def produce(folder):
        env = child_env("--xla_force_host_platform_device_count=8")
        run_module("tests._sharding_child", str(folder / "results.json"), env=env)

    folder = once_per_session(tmp_path_factory, "sharding", produce)
    return json.loads((folder / "results.json").read_text())


def _result(results, name):
    result = results[name]
    if "error" in result:
        pytest.fail(f"{name} raised in the 8-device run:\n{result['error']}")
    return result


@pytest.mark.parametrize("name", IDS)
def test_sharded_batch_matches_one_device(results, name):
    err = _result(results, name)["params_rel_err"]
    assert err <= RTOL, f"{name}: params after 3 steps differ by {err:.2e} (relative)"


@pytest.mark.parametrize("name", IDS)
def test_state_shardings_unchanged_and_params_replicated(results, name):
    result = _result(results, name)
    assert result["changed_shardings"] == [], "\n".join(result["changed_shardings"])
    assert result["params_replicated"]


@pytest.mark.parametrize("name", FACTOR_SHARDED)
def test_factor_state_sharded_across_devices(results, name):
    result = _result(results, name)
    assert result["factor_leaves_sharded"] > 0
    err = result["factor_sharded_params_rel_err"]
    assert err <= RTOL, f"{name}: params after 3 steps differ by {err:.2e} (relative)"
