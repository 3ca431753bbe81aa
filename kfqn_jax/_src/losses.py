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
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _mean_leading(per_example: Array) -> Array:
    return jnp.mean(per_example)


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
        # log(1 + exp(z)) - t z, written stably.
        vals = jnp.maximum(outputs, 0) - outputs * targets + jnp.log1p(jnp.exp(-jnp.abs(outputs)))
        return jnp.sum(vals, axis=-1)

    def sample(self, rng, outputs):
        p = jax.nn.sigmoid(jax.lax.stop_gradient(outputs))
        return jax.random.bernoulli(rng, p).astype(outputs.dtype)

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
