"""Methods driven by ``flax.nnx.Optimizer``, which hands the state back to ``update`` with its
containers converted to NNX ones: the result must equal the functional ``tx.update`` loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kfqn_jax


def _model():
    return nnx.Sequential(
        nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(6, 3, rngs=nnx.Rngs(1))
    )


X = jax.random.normal(jax.random.key(2), (8, 4))
Y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
LOSS = kfqn_jax.losses.softmax_cross_entropy()


def _grads(model):
    return nnx.grad(lambda m: LOSS(m(X), Y))(model)


def _extra(name, grads):
    # The tests compare two drivers, not the statistic: the gradient stands in for TNT's
    # sampled-label gradient.
    return {"sampled_grads": grads} if name == "tnt" else {}


@pytest.mark.parametrize("on_nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("name", ["tnt", "shampoo"])
def test_nnx_optimizer_matches_functional_updates(name, on_nonfinite):
    make = lambda: getattr(kfqn_jax, name)(  # noqa: E731
        0.05, inverse_every=1, on_nonfinite=on_nonfinite
    )
    model = _model()
    opt = nnx.Optimizer(model, make(), wrt=nnx.Param)
    for _ in range(3):
        grads = _grads(model)
        opt.update(model, grads, **_extra(name, grads))

    ref = _model()
    graphdef, params = nnx.split(ref, nnx.Param)
    tx = make()
    state = tx.init(params)
    for _ in range(3):
        grads = _grads(nnx.merge(graphdef, params))
        updates, state = tx.update(grads, state, params, **_extra(name, grads))
        params = optax.apply_updates(params, updates)

    got = jax.tree.leaves(nnx.state(model, nnx.Param))
    want = jax.tree.leaves(params)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
    moved = jax.tree.leaves(nnx.state(_model(), nnx.Param))
    assert any(
        not np.allclose(np.asarray(g), np.asarray(m)) for g, m in zip(got, moved, strict=True)
    )


def test_state_of_another_model_is_rejected():
    tx = kfqn_jax.shampoo(0.05)
    small = nnx.state(_model(), nnx.Param)
    other = nnx.state(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), nnx.Param)
    state = tx.init(other)
    with pytest.raises(ValueError, match="state created by tx.init"):
        tx.update(small, state, small)
