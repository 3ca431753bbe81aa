"""Shared types of kfqn_jax: per-layer statistics, layer descriptions and extra-arg names.

The extra-args protocol
-----------------------
Every method is an ``optax.GradientTransformationExtraArgs``. What a method needs besides the
gradient reaches ``update`` as keyword-only extra arguments with the names below, so that
``optax.chain`` passes them through untouched (they do not collide with optax's own
``value``, ``grad`` and ``value_fn``):

* ``layer_stats``: a ``dict[str, LayerStats]`` from :func:`kfqn_jax.flax.value_grads_and_stats`
  (or the NNX variant), at the current parameters.
* ``stats_fn``: a function ``params -> dict[str, LayerStats]`` evaluated by K-BFGS at the
  trial point on the same minibatch.
* ``sampled_grads``: the gradient of the loss on labels sampled from the model (TNT).
* ``loss_fn``: a function ``params -> scalar loss`` on the current minibatch (LM damping).
* ``model_fn`` / ``output_loss``: the model on the curvature batch and the loss on its outputs
  (Gauss-Newton and Hessian-free methods).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

# Names of the extra arguments, in one place.
LAYER_STATS = "layer_stats"
STATS_FN = "stats_fn"
SAMPLED_GRADS = "sampled_grads"
LOSS_FN = "loss_fn"

KINDS = ("dense", "conv", "embed")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Static description of a convolution, enough to rebuild its patches.

    Attributes:
      kernel_size: spatial kernel shape, one int per spatial dimension.
      strides: window strides.
      padding: ``"SAME"``, ``"VALID"`` or a tuple of ``(low, high)`` pairs (after any
        circular/reflect/causal pre-padding, which the capture applies to the stored input).
      input_dilation: lhs dilation.
      kernel_dilation: rhs dilation.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerMeta:
    """Static description of a captured layer (hashable; lives in the pytree's aux data).

    Attributes:
      name: the layer's name, ``"/"``-joined module path (``"Encoder_0/Dense_1"``).
      kind: ``"dense"`` (linen ``Dense``/``DenseGeneral``, NNX ``Linear``), ``"conv"`` or
        ``"embed"``.
      kernel_path: path of the weight leaf in the parameter tree, as a tuple of keys
        (``("Encoder_0", "Dense_1", "kernel")``); ``"embedding"`` for embeddings.
      bias_path: path of the bias leaf, or ``None`` for layers without bias.
      kernel_shape: shape of the weight leaf.
      n_in_axes: how many leading kernel axes are input axes. The kernel reshapes to the
        matrix ``(prod(kernel_shape[:n_in_axes]), prod(kernel_shape[n_in_axes:]))``.
      num_calls: how many times the layer ran in the forward pass (shared weights). Their
        statistics are concatenated along the position axis.
      conv: the convolution's geometry for ``kind == "conv"``.
    """

    name: str
    kind: str
    kernel_path: tuple[Any, ...]
    bias_path: tuple[Any, ...] | None
    kernel_shape: tuple[int, ...]
    n_in_axes: int
    num_calls: int = 1
    conv: ConvSpec | None = None

    @property
    def in_features(self) -> int:
        """Input dimension of the kernel matrix (without the homogeneous coordinate)."""
        n = 1
        for d in self.kernel_shape[: self.n_in_axes]:
            n *= d
        return n

    @property
    def out_features(self) -> int:
        n = 1
        for d in self.kernel_shape[self.n_in_axes :]:
            n *= d
        return n

    @property
    def has_bias(self) -> bool:
        return self.bias_path is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics captured in one forward and one or two backward passes.

    Shapes use ``B`` for the batch, ``T`` for positions (sequence steps, conv output
    locations, repeated calls of a shared layer; ``T = 1`` for a plain MLP layer), ``d_in`` and
    ``d_out`` for the flattened kernel-matrix dimensions of ``meta``.

    Attributes:
      a: layer inputs, ``(B, T, d_in)``. For a convolution these are the patches, feature
        order matching the flattened Flax kernel ``(k_1, ..., k_n, C_in)``. For an embedding,
        the integer ids ``(B, T)``.
      g: cotangent of the *batch-mean* training loss w.r.t. the layer's output (the
        pre-activation), ``(B, T, d_out)``, so that the kernel gradient is exactly
        ``sum_{b,t} a[b,t]^T g[b,t]``. The per-example loss gradient is ``B * g``.
      g_sampled: the same cotangent for targets sampled from the model's predictive
        distribution (true Fisher), or ``None`` when not requested.
      h: the layer's output (pre-activation), ``(B, T, d_out)``, or ``None``.
      g_exact: cotangents of the columns of the loss Hessian's square root,
        ``(c, B, T, d_out)`` for ``c`` model outputs, so that
        ``sum_k g_exact[k]^T g_exact[k]`` is the exact expectation of the sampled-label
        statistic (exact Fisher/GGN factors), or ``None``.
      meta: static :class:`LayerMeta`.
    """

    a: Array
    g: Array
    g_sampled: Array | None = None
    h: Array | None = None
    g_exact: Array | None = None
    meta: LayerMeta = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]


def path_key(entry: Any) -> Any:
    """Normalises one ``jax.tree_util`` key entry to a plain str/int."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def tree_paths(tree: PyTree) -> list[tuple[Any, ...]]:
    """Paths of all leaves of ``tree`` as tuples of plain keys (Flax NNX ``value`` suffixes
    dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = []
    for kp, _ in leaves:
        p = tuple(path_key(e) for e in kp)
        while p and p[-1] in ("value", "raw_value"):
            p = p[:-1]
        out.append(p)
    return out


def match_path(path: tuple[Any, ...], candidates: Mapping[tuple[Any, ...], int]) -> int | None:
    """Index of ``path`` in ``candidates`` (a dict from leaf path to leaf index), allowing the
    tree to be wrapped in a ``{"params": ...}`` collection."""
    if path in candidates:
        return candidates[path]
    prefixed = ("params",) + tuple(path)
    if prefixed in candidates:
        return candidates[prefixed]
    return None


class MissingExtraArgError(ValueError):
    """Raised when ``update`` lacks an extra argument the method needs."""


def missing_extra_arg(method: str, name: str, fix: str) -> MissingExtraArgError:
    return MissingExtraArgError(
        f"{method}.update needs the keyword argument `{name}`. {fix}\n"
        "See the full training step in the kfqn_jax README."
    )


def stats_fix_line() -> str:
    return (
        "Capture it with kfqn_jax.flax.value_grads_and_stats and pass it on, e.g.\n"
        "    out = kfqn_jax.flax.value_grads_and_stats(model, params, x, y, loss=loss, rng=rng)\n"
        "    updates, opt_state = tx.update(out.grads, opt_state, params, "
        "layer_stats=out.stats)"
    )


def as_float(dtype: Any) -> Any:
    """The float dtype statistics accumulate in for parameters of ``dtype``: float32 unless
    float64 is on and the parameters are float64."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        return jnp.float64
    return jnp.float32
