"""Switching method is a one-line change: every method, alone and chained with optax, trains
through ``make_train_step(model, loss)`` / ``make_nnx_train_step(loss)`` with no other
arguments, because each transform declares what it needs (``kfqn_jax.requirements``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kfqn_jax
from kfqn_jax import flax as kfx

N, D_IN, D_HID, C = 64, 6, 16, 3
STEPS = 12

# One hyperparameter setting per method, for this small problem (chosen once, not tuned per
# test); the train steps get no per-method argument.
METHODS = {
    "kfac": lambda: kfqn_jax.kfac(0.2, damping=1e-2, inverse_every=2),
    "kbfgs": lambda: kfqn_jax.kbfgs(0.1, damping=0.3),
    "kbfgs_l": lambda: kfqn_jax.kbfgs_l(0.1, damping=0.3, memory_size=4),
    "tnt": lambda: kfqn_jax.tnt(0.05, damping=0.1, inverse_every=2),
    "shampoo": lambda: kfqn_jax.shampoo(0.05, damping=1e-3, inverse_every=2),
    "smw_ng": lambda: kfqn_jax.smw_ng(1.0, 1.0, curvature_batch=16),
    "smw_gn": lambda: kfqn_jax.smw_gn(1.0, 1.0, curvature_batch=16),
    "hessian_free": lambda: kfqn_jax.hessian_free(damping=1.0, max_cg_iters=10),
    "block_hessian_free": lambda: kfqn_jax.block_hessian_free(damping=1.0, max_cg_iters=10),
}


def _compose(name, chained):
    tx = METHODS[name]()
    return optax.chain(optax.clip_by_global_norm(10.0), tx) if chained else tx


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(D_IN, C)), axis=-1).astype(np.int32)
    return x, y


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(jnp.tanh(nn.Dense(D_HID)(x)))


def _loss(logits, y):
    return float(kfqn_jax.losses.softmax_cross_entropy()(logits, y))


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
@pytest.mark.parametrize("name", list(METHODS))
def test_linen_train_step_with_no_arguments_trains(name, chained):
    x, y = _data()
    model = MLP()
    params = model.init(jax.random.key(1), x)["params"]
    tx = _compose(name, chained)
    state = kfx.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    step = jax.jit(kfx.make_train_step(model, "softmax_cross_entropy"))
    first = _loss(model.apply({"params": params}, x), y)
    for i in range(STEPS):
        state, loss = step(state, x, y, jax.random.key(i))
        assert np.isfinite(float(loss)), (name, i)
    final = _loss(model.apply({"params": state.params}, x), y)
    assert int(state.step) == STEPS
    assert final < 0.8 * first, (name, first, final)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.l2 = nnx.Linear(D_HID, C, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.mark.parametrize("name", list(METHODS))
def test_nnx_train_step_with_no_arguments_trains(name):
    x, y = _data(1)
    model = NNXMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _compose(name, True), wrt=nnx.Param)
    step = nnx.jit(kfx.make_nnx_train_step("softmax_cross_entropy"))
    first = _loss(model(x), y)
    for i in range(STEPS):
        loss = step(model, optimizer, x, y, jax.random.key(i))
        assert np.isfinite(float(loss)), (name, i)
    final = _loss(model(x), y)
    assert final < 0.8 * first, (name, first, final)


def test_explicit_arguments_override_the_declared_ones():
    # KFAC declares sampled-label cotangents; an explicit empirical-Fisher setup with
    # sampled=None must reach the transform as given (and KFAC then names the fix).
    x, y = _data()
    model = MLP()
    params = model.init(jax.random.key(1), x)["params"]
    state = kfx.TrainState.create(apply_fn=model.apply, params=params, tx=METHODS["kfac"]())
    step = jax.jit(kfx.make_train_step(model, "softmax_cross_entropy", sampled=None))
    with pytest.raises(ValueError, match="sampled='cotangents'"):
        step(state, x, y, jax.random.key(0))
    tx = kfqn_jax.kfac(0.2, damping=1e-2, fisher="empirical")
    state = kfx.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    state, loss = jax.jit(kfx.make_train_step(model, "softmax_cross_entropy"))(
        state, x, y, jax.random.key(0)
    )
    assert np.isfinite(float(loss))
