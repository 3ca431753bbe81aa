"""The invariant matrix: every method of kfqn_jax against the same optax-citizenship checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

from tests.method_cases import CASES, Ctx, apply_step

IDS = [c.name for c in CASES]


def _put(tree):
    return jax.device_put(tree)


def _step_fn(tx, ctx, case, trace_counter=None):
    def step(params, state):
        if trace_counter is not None:
            trace_counter.append(1)
        return apply_step(case, ctx, tx, params, state)

    return step


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_accepts_unknown_extra_args(case):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    state = tx.init(ctx.params)
    grads = jax.grad(ctx.loss_fn)(ctx.params)
    extra = case.extra_args(ctx, ctx.params)
    updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, some_unknown_arg=3.0, **extra))(
        grads, state, ctx.params
    )
    assert jax.tree.structure(updates) == jax.tree.structure(ctx.params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_missing_required_extra_args_raise(case):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    state = tx.init(ctx.params)
    grads = jax.grad(ctx.loss_fn)(ctx.params)
    extra = case.extra_args(ctx, ctx.params)
    for name in case.required:
        partial = {k: v for k, v in extra.items() if k != name}
        with pytest.raises(ValueError, match=name):
            tx.update(grads, state, ctx.params, **partial)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_recompilation_and_stable_state(case):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    traces = []
    step = jax.jit(_step_fn(tx, ctx, case, traces))
    params = _put(ctx.params)
    state = _put(tx.init(params))
    types0 = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    for _ in range(3):
        params, state, _ = step(params, state)
    assert len(traces) == 1, "the jitted step was traced again: state types changed"
    types1 = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    assert jax.tree.structure(types0) == jax.tree.structure(types1)
    assert types0 == types1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_update_dtype_matches_params_and_factors_stay_float32(case, dtype):
    ctx = Ctx(dtype=dtype)
    tx = case.factory(**case.kwargs)
    state = tx.init(ctx.params)
    step = jax.jit(_step_fn(tx, ctx, case))
    params, state, updates = step(ctx.params, state)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.dtype == p.dtype == dtype
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and jnp.ndim(leaf) >= 2:
            assert jnp.result_type(leaf) == jnp.float32, "curvature must accumulate in float32"
    assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain_with_clipping_and_schedule(case):
    ctx = Ctx()
    kwargs = dict(case.kwargs)
    kwargs["learning_rate"] = optax.linear_schedule(kwargs["learning_rate"], 0.0, 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), case.factory(**kwargs))
    params = ctx.params
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, ctx, case))
    l0 = ctx.loss_fn(params)
    for _ in range(3):
        params, state, _ = step(params, state)
    assert bool(jnp.isfinite(ctx.loss_fn(params)))
    assert ctx.loss_fn(params) < l0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams_matches_plain(case):
    ctx = Ctx()
    plain = case.factory(**case.kwargs)
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)
    outs = []
    for tx in (plain, injected):
        params, state = ctx.params, tx.init(ctx.params)
        step = jax.jit(_step_fn(tx, ctx, case))
        for _ in range(2):
            params, state, _ = step(params, state)
        outs.append(params)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_finite_on_zero_gradients(case):
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    state = tx.init(ctx.params)
    zeros = jax.tree.map(jnp.zeros_like, ctx.params)
    extra = case.extra_args(ctx, ctx.params)
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(zeros, state, ctx.params)
    for leaf in jax.tree.leaves((updates, state)):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_can_be_donated(case):
    """Training loops donate params and optimizer state; no two state leaves may share a
    buffer (XLA refuses to donate one buffer twice)."""
    ctx = Ctx()
    tx = case.factory(**case.kwargs)
    params = jax.tree.map(jnp.copy, ctx.params)
    state = tx.init(params)
    step = jax.jit(_step_fn(tx, ctx, case), donate_argnums=(0, 1))
    for _ in range(2):
        params, state, _ = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
