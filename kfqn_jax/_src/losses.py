"""Losses with a predictive distribution: value, sampling and output-space Hessian.

Second-order methods need more from a loss than its value: the true (sampled-label) Fisher
needs samples from the model's predictive distribution, and Gauss-Newton methods need the
Hessian of the loss with respect to the model outputs. Each loss here is a small immutable
object that provides all three.

Reduction convention (shared by every loss): the last axis of ``outputs`` is the event axis
(classes, pixels, regression targets). The per-example loss sums over it; the training loss is
the mean over all leading axes. For an autoencoder with outputs ``(batch, 784)`` this is the
binary cross-entropy summed over pixels and averaged over the batch, as in the K-BFGS and TNT
papers; for a sequence model with outputs ``(batch, time, vocab)`` it is the mean over tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _mean_leading(per_example: Array) -> Array:
    return jnp.mean(per_example)


# Threefry-2x32 (20 rounds), as jax.random's: rotations and key-schedule constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KS_PARITY = 0x1BD11BDA


def _rotate_left(x: Array, r: int) -> Array:
    return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """The threefry-2x32 hash of the counters ``(x0, x1)`` under the key ``(k0, k1)``, written
    out in ``jnp`` (the same function as JAX's ``threefry2x32`` primitive)."""
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(_KS_PARITY))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _flat_index(shape: tuple[int, ...]) -> Array:
    """Row-major flat index of every element of ``shape``, as ``uint32``."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def random_bits32(rng: Array, shape: tuple[int, ...]) -> Array:
    """``jax.random.bits(rng, shape, jnp.uint32)``, computed in one fused pass on CPU.

    For a threefry key (JAX's default) the result is exactly that of ``jax.random.bits``
    (partitionable threefry, JAX's default): the threefry-2x32 hash of each element's flat
    index, its two output words XORed. On the CPU backend JAX lowers the hash as a rolled loop
    of five steps that each write their two state arrays to memory; written out in ``jnp``
    here, XLA fuses it unrolled into the operation that consumes the bits. Other backends,
    other key implementations, ``jax_threefry_partitionable=False`` and arrays of ``2^32`` or
    more elements call ``jax.random.bits``.
    """
    shape = tuple(int(d) for d in shape)

    def reference():
        return jax.random.bits(rng, shape, jnp.uint32)

    if (
        not shape
        or math.prod(shape) >= 2**32
        or str(jax.random.key_impl(rng)) != "threefry2x32"
        or not jax.config.jax_threefry_partitionable
    ):
        return reference()
    key = jax.random.key_data(rng)

    def fused():
        hi, lo = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), _flat_index(shape))
        return hi ^ lo

    return jax.lax.platform_dependent(cpu=fused, default=reference)


def bernoulli_bits(bits: Array, p: Array) -> Array:
    """Bernoulli(``p``) draws from uniform ``uint32`` ``bits``: ``bits < ⌊p · 2^32⌋``, and
    ``True`` where ``p >= 1``. Exact to within ``2^-32``; ``p <= 0`` and NaN give ``False``.
    The threshold is formed in at least float32 (``p · 2^32`` overflows float16)."""
    p = p.astype(jnp.promote_types(p.dtype, jnp.float32))
    # p < 1 in float32 is at most 1 - 2^-24, so p * 2^32 <= 2^32 - 2^8 fits in uint32.
    below_one = jnp.where(p < 1, jnp.maximum(p, 0), 0)
    threshold = (below_one * 2.0**32).astype(jnp.uint32)
    return (bits < threshold) | (p >= 1)


@dataclasses.dataclass(frozen=True)
class Loss:
    """Base class. Subclasses implement :meth:`per_example`, :meth:`sample` and :meth:`hvp`.

    A user-defined loss for other predictive distributions subclasses this and implements the
    same three methods; everything in ``kfqn_jax`` that needs sampled labels or output-space
    curvature only calls these.
    """

    name: str = dataclasses.field(default="loss", init=False)

    def per_example(self, outputs: Array, targets: Any) -> Array:
        """Loss per example, shape ``outputs.shape[:-1]``."""
        raise NotImplementedError

    def __call__(self, outputs: Array, targets: Any) -> Array:
        """Mean loss over all leading axes (the training objective)."""
        return _mean_leading(self.per_example(outputs, targets))

    def sample(self, rng: Array, outputs: Array) -> Any:
        """Targets drawn from the model's predictive distribution at ``outputs``."""
        raise NotImplementedError

    def hvp(self, outputs: Array, v: Array) -> Array:
        """Per-example product of the loss Hessian w.r.t. the outputs with ``v``.

        Acts on the event axis only: returns ``H_i v_i`` for every leading index ``i`` where
        ``H_i`` is the Hessian of :meth:`per_example` (not of the mean) at ``outputs[i]``.
        """
        raise NotImplementedError

    def hessian_sqrt(self, outputs: Array) -> Array:
        """Per-example ``L`` with ``L L^T`` the Hessian w.r.t. the outputs, ``(..., c, c)``.

        The base implementation uses a (clipped) eigendecomposition of :meth:`hessian`.
        """
        w, v = jnp.linalg.eigh(self.hessian(outputs))
        return v * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]

    def hessian(self, outputs: Array) -> Array:
        """Per-example Hessian w.r.t. the outputs, shape ``outputs.shape + (c,)``."""
        c = outputs.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(c, dtype=outputs.dtype), outputs.shape[:-1] + (c, c))
        # Column k of H_i is H_i e_k.
        cols = jax.vmap(lambda e: self.hvp(outputs, e), in_axes=-1, out_axes=-1)(eye)
        return cols


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    """Categorical cross-entropy on logits; targets are integer labels or probabilities."""

    name: str = dataclasses.field(default="softmax_cross_entropy", init=False)

    def per_example(self, outputs, targets):
        logp = jax.nn.log_softmax(outputs, axis=-1)
        targets = jnp.asarray(targets)
        if jnp.issubdtype(targets.dtype, jnp.integer):
            if targets.shape != outputs.shape[:-1]:
                raise ValueError(
                    f"softmax_cross_entropy: integer labels must have shape {outputs.shape[:-1]} "
                    f"(outputs without the class axis), got {targets.shape}."
                )
            return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        if targets.shape != outputs.shape:
            raise ValueError(
                "softmax_cross_entropy: probability targets must have the shape of the logits "
                f"{outputs.shape}, got {targets.shape}. Pass integer labels or one-hot vectors."
            )
        return -jnp.sum(targets * logp, axis=-1)

    def sample(self, rng, outputs):
        return jax.random.categorical(rng, jax.lax.stop_gradient(outputs), axis=-1)

    def hvp(self, outputs, v):
        p = jax.nn.softmax(outputs, axis=-1)
        pv = jnp.sum(p * v, axis=-1, keepdims=True)
        return p * v - p * pv

    def hessian_sqrt(self, outputs):
        # (diag(sqrt p) - p sqrt(p)^T)(...)^T = diag(p) - p p^T because sum(p) = 1.
        p = jax.nn.softmax(outputs, axis=-1)
        sp = jnp.sqrt(p)
        c = outputs.shape[-1]
        return sp[..., :, None] * jnp.eye(c, dtype=p.dtype) - p[..., :, None] * sp[..., None, :]


@dataclasses.dataclass(frozen=True)
class SigmoidCrossEntropy(Loss):
    """Binary cross-entropy on logits, summed over the event axis; targets in [0, 1]."""

    name: str = dataclasses.field(default="sigmoid_cross_entropy", init=False)

    def per_example(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        if targets.shape != outputs.shape:
            raise ValueError(
                "sigmoid_cross_entropy: targets must have the shape of the logits "
                f"{outputs.shape}, got {targets.shape}."
            )
        # log(1 + exp(z)) - t z. softplus is stable and its derivative is sigmoid(z) everywhere;
        # max(z, 0) + log1p(exp(-|z|)) has the same value but differentiates to 0 at z = 0.
        vals = jax.nn.softplus(outputs) - outputs * targets
        return jnp.sum(vals, axis=-1)

    def sample(self, rng, outputs):
        """Bernoulli labels ``ŷ ~ Bernoulli(sigmoid(outputs))``, in the dtype of ``outputs``.

        Each label compares 32 random bits ``u`` (``jax.random.bits(rng, ...)``, see
        :func:`random_bits32`) with the probability on the same scale: ``ŷ = 1`` iff
        ``u < ⌊p · 2^32⌋``, and always for ``p = 1``. So ``P(ŷ = 1)`` is ``p`` to within
        ``2^-32`` (``jax.random.bernoulli`` compares with a uniform float of 23 random bits),
        and no floats are made from the bits. The labels are a deterministic function of
        ``rng`` and ``outputs``.
        """
        p = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return bernoulli_bits(random_bits32(rng, p.shape), p).astype(outputs.dtype)

    def hvp(self, outputs, v):
        p = jax.nn.sigmoid(outputs)
        return p * (1 - p) * v

    def hessian_sqrt(self, outputs):
        p = jax.nn.sigmoid(outputs)
        c = outputs.shape[-1]
        return jnp.sqrt(p * (1 - p))[..., :, None] * jnp.eye(c, dtype=outputs.dtype)


@dataclasses.dataclass(frozen=True)
class SquaredError(Loss):
    """Gaussian negative log-likelihood up to a constant: ``0.5 * sum((z - t)**2) / variance``."""

    variance: float = 1.0
    name: str = dataclasses.field(default="squared_error", init=False)

    def __post_init__(self):
        if not self.variance > 0:
            raise ValueError(f"squared_error: variance must be > 0, got {self.variance}.")

    def per_example(self, outputs, targets):
        targets = jnp.asarray(targets, outputs.dtype)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"squared_error: targets must have the shape of the outputs {outputs.shape}, "
                f"got {targets.shape}."
            )
        return 0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1) / self.variance

    def sample(self, rng, outputs):
        outputs = jax.lax.stop_gradient(outputs)
        noise = jax.random.normal(rng, outputs.shape, outputs.dtype)
        return outputs + jnp.sqrt(jnp.asarray(self.variance, outputs.dtype)) * noise

    def hvp(self, outputs, v):
        return v / self.variance

    def hessian_sqrt(self, outputs):
        c = outputs.shape[-1]
        eye = jnp.eye(c, dtype=outputs.dtype) / jnp.sqrt(jnp.asarray(self.variance, outputs.dtype))
        return jnp.broadcast_to(eye, outputs.shape + (c,))


def softmax_cross_entropy() -> SoftmaxCrossEntropy:
    """Categorical cross-entropy on logits (integer labels or probability targets)."""
    return SoftmaxCrossEntropy()


def sigmoid_cross_entropy() -> SigmoidCrossEntropy:
    """Binary cross-entropy on logits, summed over the last axis."""
    return SigmoidCrossEntropy()


def squared_error(variance: float = 1.0) -> SquaredError:
    """Half squared error summed over the last axis (Gaussian likelihood with ``variance``)."""
    return SquaredError(variance=variance)


def as_loss(loss: Any) -> Loss:
    """Accepts a :class:`Loss` or one of the names ``"softmax_cross_entropy"``,
    ``"sigmoid_cross_entropy"``, ``"squared_error"``."""
    if isinstance(loss, Loss):
        return loss
    table = {
        "softmax_cross_entropy": softmax_cross_entropy,
        "sigmoid_cross_entropy": sigmoid_cross_entropy,
        "squared_error": squared_error,
    }
    if isinstance(loss, str) and loss in table:
        return table[loss]()
    raise TypeError(
        f"Expected a kfqn_jax.losses.Loss or one of {sorted(table)}, got {loss!r}. "
        "For another predictive distribution subclass kfqn_jax.losses.Loss and implement "
        "per_example, sample and hvp."
    )
