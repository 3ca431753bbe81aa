"""Sampled labels: the Bernoulli draw of the sigmoid cross-entropy and its random bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfqn_jax import losses
from kfqn_jax._src import losses as losses_src


def _logit(p: float) -> float:
    if p == 0:
        return -np.inf
    if p == 1:
        return np.inf
    return float(np.log(p) - np.log1p(-p))


@pytest.mark.parametrize("p", [0.0, 1e-3, 0.3, 0.5, 0.999, 1.0])
def test_sigmoid_sample_mean_matches_the_probability(p):
    shape = (1000, 1001)
    n = shape[0] * shape[1]
    z = jnp.full(shape, _logit(p), jnp.float32)
    p32 = float(jax.nn.sigmoid(z[0, 0]))  # the probability the sampler sees, in float32
    y = losses.sigmoid_cross_entropy().sample(jax.random.key(7), z)
    assert y.shape == shape and y.dtype == jnp.float32
    y = np.asarray(y)
    assert set(np.unique(y)) <= {0.0, 1.0}
    if p == 0:
        assert not y.any()
        return
    if p == 1:
        assert y.all()
        return
    # Five binomial standard deviations of the mean of n draws (a false alarm about 6e-7).
    sd = np.sqrt(p32 * (1 - p32) / n)
    assert abs(y.mean() - p32) < 5 * sd, (y.mean(), p32, sd)


def test_sigmoid_sample_is_exact_at_saturated_logits():
    # Logits whose float32 sigmoid rounds to exactly 1 or underflows towards 0.
    z = jnp.concatenate([jnp.full((200, 500), 40.0), jnp.full((200, 500), -120.0)])
    y = np.asarray(losses.sigmoid_cross_entropy().sample(jax.random.key(1), z))
    assert y[:200].all()
    assert not y[200:].any()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_sigmoid_sample_in_half_precision(dtype):
    # The threshold p * 2^32 is formed in float32: it would overflow float16.
    z = jnp.concatenate([jnp.zeros((500, 400)), jnp.full((500, 400), 30.0)]).astype(dtype)
    y = losses.sigmoid_cross_entropy().sample(jax.random.key(2), z)
    assert y.dtype == dtype
    y = np.asarray(y, np.float32)
    assert abs(y[:500].mean() - 0.5) < 5 * np.sqrt(0.25 / y[:500].size)
    assert y[500:].all()


def test_bernoulli_bits_thresholds_are_exact():
    bits_max = np.uint32(2**32 - 1)
    bits = jnp.array([0, bits_max, 0, bits_max, 2, 3, 0, 0], jnp.uint32)
    p = jnp.array([0.0, 1.0, 1.0, 1 - 2.0**-24, 3 * 2.0**-32, 3 * 2.0**-32, -0.5, jnp.nan])
    got = np.asarray(losses_src.bernoulli_bits(bits, p.astype(jnp.float32)))
    # p = 0 never fires (not even for bits 0); p = 1 always (even for the largest bits);
    # p = k 2^-32 fires exactly for the k values 0 .. k - 1; negative and NaN never fire.
    np.testing.assert_array_equal(got, [False, True, True, False, True, False, False, False])


@pytest.mark.parametrize("shape", [(400, 784), (3, 5, 7), (7,), (3, 1), (0, 4)])
def test_random_bits_equal_jax_random_bits(shape):
    # The fused threefry is the same function as jax.random.bits, under jit or not.
    for key in (jax.random.key(11), jax.random.PRNGKey(12)):
        want = jax.random.bits(key, shape, jnp.uint32)
        got = losses_src.random_bits32(key, shape)
        assert got.shape == shape and got.dtype == jnp.uint32
        np.testing.assert_array_equal(got, want)
        jitted = jax.jit(losses_src.random_bits32, static_argnums=1)
        np.testing.assert_array_equal(jitted(key, shape), want)


def test_random_bits_under_vmap_and_for_other_key_kinds():
    keys = jax.random.split(jax.random.key(3), 4)
    batched = jax.vmap(lambda k: losses_src.random_bits32(k, (5, 7)))(keys)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], jax.random.bits(keys[i], (5, 7), jnp.uint32))
    # Other implementations go to jax.random.bits.
    rbg = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(
        losses_src.random_bits32(rbg, (5, 7)), jax.random.bits(rbg, (5, 7), jnp.uint32)
    )


def test_sigmoid_cross_entropy_gradient_is_sigmoid_minus_target():
    # Including z = 0 exactly (a zero-initialised output layer), where max(z, 0) and |z| have
    # kinks; and far in the tails.
    with jax.enable_x64(True):
        z = jnp.array([[0.0, 0.0, 1e-3, -40.0, 40.0, 3.0]])
        t = jnp.array([[0.0, 1.0, 0.3, 1.0, 0.0, 0.5]])
        loss = losses.sigmoid_cross_entropy()
        got = jax.grad(lambda o: jnp.sum(loss.per_example(o, t)))(z)
        want = 1.0 / (1.0 + np.exp(-np.asarray(z))) - np.asarray(t)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        value = loss.per_example(z, t)
        want_value = np.sum(np.logaddexp(0.0, np.asarray(z)) - np.asarray(z * t))
        np.testing.assert_allclose(value, want_value, rtol=1e-12)
