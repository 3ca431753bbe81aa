"""Coverage report and KFAC's fallback for parameters outside any block."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfqn_jax
from kfqn_jax import flax as kfx


class Mixed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 4)(ids)
        x = nn.LayerNorm()(x)
        x = nn.Dense(3)(x)
        return nn.Dense(2, use_bias=False)(x).mean(axis=1)


def _setup():
    model = Mixed()
    ids = jnp.arange(12).reshape(3, 4) % 10
    params = model.init(jax.random.key(0), ids)["params"]
    return model, ids, params


def test_report_lists_blocks_and_fallbacks():
    model, ids, params = _setup()
    rep = kfqn_jax.coverage_report(params, "kfac")
    by_path = {r.path: r for r in rep.rows}
    assert by_path["Dense_0/kernel"].block and by_path["Dense_0/bias"].block
    assert by_path["Dense_1/kernel"].block
    for p in ("Embed_0/embedding", "LayerNorm_0/scale", "LayerNorm_0/bias"):
        assert by_path[p].block is None
    assert len(rep.rows) == len(jax.tree.leaves(params))
    text = str(rep)
    assert "fallback" in text and "Dense_0/kernel" in text
    # With the captured layers as the spec, the same split.
    metas = kfx.layer_metas(model, params, ids)
    rep2 = kfqn_jax.coverage_report(params, "kfac", layers=metas)
    assert [r.block is None for r in rep2.rows] == [r.block is None for r in rep.rows]
    assert all(r.block for r in kfqn_jax.coverage_report(params, "tnt").rows)
    with pytest.raises(ValueError, match="Unknown method"):
        kfqn_jax.coverage_report(params, "nope")


def test_kfac_fallback_transform_gets_the_uncovered_leaves():
    model, ids, params = _setup()
    y = jnp.zeros((3, 2))
    loss = kfqn_jax.losses.squared_error()
    out = kfx.value_grads_and_stats(
        model, params, ids, targets=y, loss=loss, rng=jax.random.key(1), sampled="cotangents"
    )
    tx = kfqn_jax.scale_by_kfac(0.1, momentum=0.0, fallback=optax.scale(-7.0))
    state = tx.init(params)
    upd, _ = tx.update(out.grads, state, params, layer_stats=out.stats)
    for path in (("Embed_0", "embedding"), ("LayerNorm_0", "scale")):
        g = out.grads[path[0]][path[1]]
        np.testing.assert_allclose(upd[path[0]][path[1]], -7.0 * g, rtol=1e-6)
    # Covered leaves are preconditioned, not scaled by the fallback.
    assert not np.allclose(upd["Dense_0"]["kernel"], -7.0 * out.grads["Dense_0"]["kernel"])


def test_default_fallback_named_per_method():
    params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}, "scale": jnp.ones(2)}
    assert "optax.trace" in kfqn_jax.coverage_report(params, "kfac").fallback
    assert "optax.ema" in kfqn_jax.coverage_report(params, "kbfgs").fallback
    assert "over the damping" in kfqn_jax.coverage_report(params, "smw_ng").fallback
    assert "own update" in kfqn_jax.coverage_report(params, "tnt").fallback
