"""Checkpointing with orbax-checkpoint: a resumed run continues bit for bit.

For every method, one child interpreter (tests/_checkpoint_child.py) takes ``K`` steps,
saves params and optimizer state with ``orbax.checkpoint.StandardCheckpointer``, and goes on
for ``K`` more steps; a second, fresh interpreter restores the checkpoint into the abstract
state of a newly built optimizer (``jax.eval_shape`` of its ``init``) and takes the same
``K`` steps. On the CPU the two final params and states must be equal bitwise.

The children share a persistent compilation cache, so the fresh interpreter loads the step's
executable instead of compiling it again (it only saves time: its inputs, restored from the
checkpoint, must still have the types and values of the uninterrupted run's to hit the cache
and to give the same result).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests._child_process import child_env, once_per_session, run_module
from tests.method_cases import CASES

IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def produce(folder):
        env = child_env(
            JAX_COMPILATION_CACHE_DIR=str(folder / "compilation_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        for mode in ("save", "resume"):
            run_module("tests._checkpoint_child", mode, str(folder), env=env)

    return once_per_session(tmp_path_factory, "checkpoint", produce)


@pytest.mark.parametrize("name", IDS)
def test_resumed_run_equals_uninterrupted_bitwise(runs, name):
    for mode in ("save", "resume"):
        error = json.loads((runs / f"{mode}.json").read_text())[name]
        if error is not None:
            pytest.fail(f"{name}: the {mode} run raised:\n{error}")
    with (
        np.load(runs / name / "uninterrupted.npz") as expected,
        np.load(runs / name / "resumed.npz") as got,
    ):
        assert sorted(got.files) == sorted(expected.files), "params and state trees differ"
        for key in expected.files:
            a, b = expected[key], got[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype)
            assert np.array_equal(a, b), f"{name}: {key} differs after resuming"
