"""Training helpers: linen ``TrainState``/``make_train_step``, and ``nnx.Optimizer`` with KFAC."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state as flax_train_state

import kfqn_jax
from kfqn_jax import flax as kfx

N, D_IN, D_HID, C = 32, 4, 8, 3


def _data(seed=0):
    """A learnable 3-class problem (labels from a random linear map), numpy float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(D_IN, C)), axis=-1).astype(np.int32)
    return x, y


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(jnp.tanh(nn.Dense(D_HID)(x)))


class BNMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=False, momentum=0.5)(nn.Dense(D_HID)(x))
        return nn.Dense(C)(jnp.tanh(x))


def _linen_init(model, x, seed=1):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _tx():
    return kfqn_jax.kfac(0.2, damping=1e-2, inverse_every=2)


def test_kfac_through_train_state_decreases_the_loss():
    x, y = _data()
    model = MLP()
    params = _linen_init(model, x)["params"]
    state = kfx.TrainState.create(apply_fn=model.apply, params=params, tx=_tx())
    step = jax.jit(kfx.make_train_step(model, "softmax_cross_entropy", sampled="cotangents"))
    losses = []
    for i in range(6):
        state, loss = step(state, x, y, jax.random.key(i))
        losses.append(float(loss))
    assert int(state.step) == 6
    assert np.isfinite(losses).all()
    final = float(
        kfqn_jax.losses.softmax_cross_entropy()(model.apply({"params": state.params}, x), y)
    )
    assert final < 0.7 * losses[0], losses + [final]


def test_kfac_through_nnx_optimizer_decreases_the_loss():
    x, y = _data()

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
            self.l2 = nnx.Linear(D_HID, C, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    model = NNXMLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, rng):
        out = kfx.nnx_value_grads_and_stats(
            model, x, targets=y, loss="softmax_cross_entropy", rng=rng, sampled="cotangents"
        )
        opt.update(model, out.grads, layer_stats=out.stats)
        return out.loss

    losses = [float(step(model, opt, jax.random.key(i))) for i in range(6)]
    final = float(kfqn_jax.losses.softmax_cross_entropy()(model(x), y))
    assert np.isfinite(losses).all()
    assert int(opt.step[...]) == 6
    assert final < 0.7 * losses[0], losses + [final]


def _recording_tx(y):
    """A transform that evaluates every extra arg it is given (``y``: the batch's targets) and
    keeps the results in its state; plain gradient descent otherwise."""

    def init(params):
        z = jnp.zeros((), jnp.float32)
        return {"loss": z, "stats_diff": z, "sampled_norm": z, "n_stats": z, "model_loss": z}

    def update(
        updates,
        state,
        params=None,
        *,
        layer_stats=None,
        sampled_grads=None,
        stats_fn=None,
        loss_fn=None,
        model_fn=None,
        output_loss=None,
        **extra,
    ):
        del state, extra
        trial = stats_fn(params)
        new = {
            "loss": loss_fn(params),
            "stats_diff": sum(
                jnp.max(jnp.abs(trial[k].g - s.g)) + jnp.max(jnp.abs(trial[k].a - s.a))
                for k, s in layer_stats.items()
            ),
            "sampled_norm": optax.tree.norm(sampled_grads),
            "n_stats": jnp.asarray(len(layer_stats), jnp.float32),
            "model_loss": output_loss(model_fn(params), y),
        }
        return jax.tree.map(lambda g: -0.1 * g, updates), new

    return optax.GradientTransformationExtraArgs(init, update)


def test_train_step_passes_every_needed_extra_arg_and_updates_batch_stats():
    x, y = _data()
    model = BNMLP()
    variables = _linen_init(model, x)
    tx = _recording_tx(y)
    state = kfx.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        extra_variables={"batch_stats": variables["batch_stats"]},
    )
    needs = ("layer_stats", "sampled_grads", "stats_fn", "loss_fn", "model_fn", "output_loss")
    step = jax.jit(
        kfx.make_train_step(
            model, "softmax_cross_entropy", sampled="grads", needs=needs, mutable=["batch_stats"]
        )
    )
    new, loss = step(state, x, y, jax.random.key(0))
    rec = new.opt_state
    np.testing.assert_allclose(rec["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(rec["model_loss"], loss, rtol=1e-6)
    assert float(rec["stats_diff"]) < 1e-5  # stats_fn at the same params: the same statistics
    assert float(rec["sampled_norm"]) > 0
    assert float(rec["n_stats"]) == 2
    # The batch statistics went through the state; the parameters took the descent step.
    _, mutated = model.apply(
        {"params": state.params, **state.extra_variables}, x, mutable=["batch_stats"]
    )
    for a, b in zip(
        jax.tree.leaves(new.extra_variables), jax.tree.leaves(mutated["batch_stats"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1
    assert not np.allclose(new.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


def test_apply_gradients_forwards_extra_args_and_replaces_fields():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    params = {"w": np.ones(2, np.float32)}
    state = kfx.TrainState.create(apply_fn=None, params=params, tx=tx)
    new = state.apply_gradients(
        grads={"w": np.ones(2, np.float32)}, layer_stats="S", extra_variables={"b": 1}
    )
    assert seen == {"layer_stats": "S"}
    assert new.extra_variables == {"b": 1}
    np.testing.assert_allclose(new.params["w"], 2.0)
    assert new.step == 1
    assert isinstance(new, flax_train_state.TrainState)


def test_make_train_step_with_a_plain_flax_train_state_and_an_explicit_tx():
    x, y = _data()
    model = MLP()
    params = _linen_init(model, x)["params"]
    tx = _recording_tx(y)
    # A plain Flax TrainState drops extra args in apply_gradients: make_train_step calls tx.
    state = flax_train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    needs = ("layer_stats", "sampled_grads", "stats_fn", "loss_fn", "model_fn", "output_loss")
    step = kfx.make_train_step(model, "softmax_cross_entropy", sampled="both", needs=needs)
    new, loss = jax.jit(step)(state, x, y, jax.random.key(0))
    np.testing.assert_allclose(new.opt_state["loss"], loss, rtol=1e-6)
    assert int(new.step) == 1


def test_make_train_step_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown extra args"):
        kfx.make_train_step(MLP(), "softmax_cross_entropy", needs=("layer_stats", "grads"))
    with pytest.raises(ValueError, match="sampled='grads'"):
        kfx.make_train_step(MLP(), "softmax_cross_entropy", needs=("sampled_grads",))
