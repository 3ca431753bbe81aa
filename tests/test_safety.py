"""Numerical safety of every method: non-finite inputs never reach the state or the parameters.

A seeded fuzz over every method of ``tests/method_cases.py``: NaN, +Inf, huge (1e30) and zero
values in the gradients, in the arrays of the extra args, and in what the extra-arg functions
return, and tiny (1e-12) and huge (1e12) damping. Each method is compiled once (the corruption
and the damping are traced inputs: the transform is wrapped in ``optax.inject_hyperparams`` so
that the damping can be set in the state), then stepped through every scenario.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from tests.method_cases import CASES, Ctx, MethodCase

IDS = [c.name for c in CASES]

# Corruption codes (traced int32 inputs of the compiled step).
KINDS = {"nan": 1, "inf": 2, "huge": 3, "zero": 4}
TARGETS = {"grads": 0, "extra": 1, "functions": 2}
HUGE = 1e30
PATTERN = (True, False, True)  # corrupted, clean, corrupted


def _float_arrays(tree: Any) -> list[int]:
    leaves = jax.tree.leaves(tree)
    return [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
    ]


def corrupt(tree: Any, kind: jax.Array, seed: jax.Array) -> Any:
    """The float array leaves of ``tree`` with ``kind`` applied: 0 none; 1 (NaN) and 2 (+Inf)
    replace one element of every leaf, chosen by the int ``seed`` (so a field the method reads
    is always hit; the guard checks results, and a field it ignores is harmless); 3 sets every
    element to ``±1e30``; 4 zeroes every element. Other leaves (functions, losses, ints) are
    kept.

    ``kind`` and ``seed`` may be traced: one compiled step serves every scenario."""
    leaves, treedef = jax.tree.flatten(tree)
    idx = _float_arrays(tree)
    if not idx:
        return tree
    out = list(leaves)
    for j, i in enumerate(idx):
        x = leaves[i]
        pos = (seed + 7919 * j) % max(x.size, 1)
        hit = (jnp.arange(x.size) == pos).reshape(x.shape)
        bad = jnp.where(kind == 1, jnp.nan, jnp.inf).astype(x.dtype)
        y = jnp.where(hit & ((kind == 1) | (kind == 2)), bad, x)
        y = jnp.where(kind == 3, jnp.where(x < 0, -HUGE, HUGE).astype(x.dtype), y)
        y = jnp.where(kind == 4, jnp.zeros_like(x), y)
        out[i] = y
    return treedef.unflatten(out)


def _is_function(v: Any) -> bool:
    return callable(v) and not isinstance(v, kfqn_jax.losses.Loss)


@dataclasses.dataclass
class Runner:
    """One method, compiled once: ``step(params, state, kind, target, seed)``."""

    ctx: Ctx
    tx: Any
    params: Any
    state: Any
    step: Callable[..., Any]
    extra_has_arrays: bool


_RUNNERS: dict[str, Runner] = {}


def runner(case: MethodCase) -> Runner:
    if case.name in _RUNNERS:
        return _RUNNERS[case.name]
    ctx = Ctx()
    tx = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)

    def step(params, state, kind, target, seed):
        grads = jax.grad(ctx.loss_fn)(params)
        grads = corrupt(grads, jnp.where(target == 0, kind, 0), seed)
        extra = case.extra_args(ctx, params)
        extra = corrupt(extra, jnp.where(target == 1, kind, 0), seed)
        f_kind = jnp.where(target == 2, kind, 0)
        extra = {
            k: (lambda *a, f=v: corrupt(f(*a), f_kind, seed)) if _is_function(v) else v
            for k, v in extra.items()
        }
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    has_arrays = bool(_float_arrays(case.extra_args(ctx, ctx.params)))
    # The least XLA optimisation: compiling dominates these tests' time, running is negligible.
    jitted = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})

    def call(params, state, kind, target, seed):
        # The same (strong int32) input types every call: one trace per method.
        return jitted(params, state, np.int32(kind), np.int32(target), np.int32(seed))

    run = Runner(ctx, tx, ctx.params, tx.init(ctx.params), call, has_arrays)
    _RUNNERS[case.name] = run
    return run


def nonfinite_count(state: Any) -> int:
    return int(optax.tree_utils.tree_get(state, "nonfinite_count"))


def assert_finite(tree: Any, what: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"non-finite {what} at {path}"


def without_counters(state: Any) -> Any:
    """The method's chain state with ``nonfinite_count`` zeroed (``inject_hyperparams``' own
    step counter, outside ``inner_state``, is dropped)."""
    return optax.tree_utils.tree_set(state.inner_state, nonfinite_count=0)


def assert_trees_equal(a: Any, b: Any) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Methods whose results depend on every example of the statistics they are given.
READS_EVERY_ELEMENT = ("kfac", "kbfgs", "kbfgs_l", "tnt")


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fuzz_corrupted_steps(case, kind, target):
    run = runner(case)
    rng = np.random.default_rng(zlib.crc32(f"{case.name}/{kind}/{target}".encode()))
    params, state = run.params, run.state
    n_before = 0
    for i, bad in enumerate(PATTERN):
        code = KINDS[kind] if bad else 0
        before = params
        seed = np.int32(rng.integers(0, 2**30))
        params, state = run.step(params, state, code, TARGETS[target], seed)
        assert_finite(params, f"parameters after step {i}")
        assert_finite(state, f"state after step {i}")
        skipped = nonfinite_count(state) > n_before
        n_before = nonfinite_count(state)
        if skipped:
            # A skipped step: zero updates (no weight decay in the cases).
            assert_trees_equal(params, before)
    n = nonfinite_count(state)
    n_bad = sum(PATTERN)
    if kind in ("nan", "inf") and target == "grads":
        assert n == n_bad
    elif kind in ("nan", "inf") and target == "extra":
        if not run.extra_has_arrays:
            assert n == 0
        elif case.name in READS_EVERY_ELEMENT:
            assert n == n_bad
        else:
            # SMW reads only the curvature batch (the first examples): a value outside it is
            # never used, and the step may go ahead (with finite results, checked above).
            assert n <= n_bad
    elif kind == "zero":
        assert n == 0
    else:
        # Huge values, and non-finite values returned by functions, may be absorbed by the
        # method itself (a rejected line-search step, a skipped BFGS update) or overflow later.
        assert 0 <= n <= len(PATTERN)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_skipped_step_keeps_state_and_next_step_resumes(case):
    run = runner(case)
    seed = np.int32(12345)
    p_skip, s_skip = run.step(run.params, run.state, KINDS["nan"], TARGETS["grads"], seed)
    assert nonfinite_count(s_skip) == 1
    assert_trees_equal(p_skip, run.params)
    assert_trees_equal(without_counters(s_skip), without_counters(run.state))
    # A clean step after the skipped one is the clean step from the start.
    p_next, s_next = run.step(p_skip, s_skip, 0, 0, seed)
    p_ref, s_ref = run.step(run.params, run.state, 0, 0, seed)
    assert nonfinite_count(s_next) == 1 and nonfinite_count(s_ref) == 0
    assert_trees_equal(p_next, p_ref)
    assert_trees_equal(without_counters(s_next), without_counters(s_ref))
    assert not all(
        bool(jnp.all(a == b))
        for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(run.params), strict=True)
    ), "the clean step did not move the parameters"


@pytest.mark.parametrize("damping", [1e-12, 1e12], ids=["tiny", "huge"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_damping(case, damping):
    run = runner(case)
    # The damping hyperparameter and, for Levenberg-Marquardt methods, the adapted damping.
    state = optax.tree_utils.tree_set(run.state, damping=jnp.asarray(damping, jnp.float32))
    params = run.params
    for i in range(3):
        params, state = run.step(params, state, 0, 0, np.int32(i))
        assert_finite(params, f"parameters after step {i}")
        assert_finite(state, f"state after step {i}")
    assert 0 <= nonfinite_count(state) <= 3
    if damping > 1:
        moved = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run.params), strict=True)
        )
        assert moved < 1e-4, f"huge damping should give tiny steps, moved {moved}"


@pytest.mark.parametrize("damping", [1e-12, 1e12], ids=["tiny", "huge"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extreme_damping_construction_and_lm_floor(case, damping):
    tx = case.factory(**{**case.kwargs, "damping": damping})
    state = tx.init(runner(case).params)
    assert nonfinite_count(state) == 0
    for field in jax.tree_util.tree_flatten_with_path(state)[0]:
        path, leaf = field
        if str(path[-1]) == ".damping":  # adapted (Levenberg-Marquardt) damping
            assert np.float32(1e-8) <= leaf <= np.float32(1e8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_factors_with_x64(case):
    params = runner(case).params
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        state = jax.eval_shape(case.factory(**case.kwargs).init, params64)
        floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float64 for x in floats)
        assert optax.tree_utils.tree_get(state, "nonfinite_count").dtype == jnp.int32


# ------------------------------------------------------------------------------------------------
# on_nonfinite="raise" and "ignore", on a tiny Shampoo problem.
# ------------------------------------------------------------------------------------------------


def _tiny(on_nonfinite):
    tx = kfqn_jax.shampoo(0.1, damping=1e-3, on_nonfinite=on_nonfinite)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
    bad = {"w": grads["w"].at[1, 2].set(jnp.nan), "b": grads["b"]}
    return tx, params, grads, bad


def test_raise_mode_under_jit():
    tx, params, grads, bad = _tiny("raise")
    step = jax.jit(tx.update)
    updates, state = step(grads, tx.init(params), params)
    jax.block_until_ready(updates)
    assert nonfinite_count(state) == 0
    # JAX wraps the FloatingPointError raised on the device; its message is kept.
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match=r"FloatingPointError: shampoo: non-finite values \(NaN or Inf\) in the incoming "
        r"gradients.*on_nonfinite='skip'",
    ):
        jax.block_until_ready(step(bad, state, params))


def test_ignore_mode_lets_nonfinite_values_through():
    tx, params, _, bad = _tiny("ignore")
    updates, state = jax.jit(tx.update)(bad, tx.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(updates["w"])))
    assert nonfinite_count(state) == 0


def test_skip_mode_catches_nonfinite_state():
    """Finite gradients whose square overflows float32: the statistics become infinite, so the
    step is skipped although the inputs were finite."""
    tx, params, grads, _ = _tiny("skip")
    huge = jax.tree.map(lambda g: g * 1e25, grads)
    state0 = tx.init(params)
    updates, state = jax.jit(tx.update)(huge, state0, params)
    assert nonfinite_count(state) == 1
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert_finite(state, "state")
