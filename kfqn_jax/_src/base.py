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
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kfqn_jax._src import extra_args

Array = jax.Array
PyTree = Any

# The extra-argument names live in kfqn_jax._src.extra_args; re-exported for older imports.
LAYER_STATS = extra_args.LAYER_STATS
STATS_FN = extra_args.STATS_FN
SAMPLED_GRADS = extra_args.SAMPLED_GRADS
LOSS_FN = extra_args.LOSS_FN

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
        "    out = kfqn_jax.flax.value_grads_and_stats(model, params, x, targets=y, loss=loss,\n"
        "                                              rng=rng, sampled='cotangents')\n"
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


# ------------------------------------------------------------------------------------------------
# Checks of hyperparameters at construction time.
#
# Every check skips values it cannot see: schedules (callables) where they are allowed, and
# arrays, which ``optax.inject_hyperparams`` passes (traced) when it rebuilds the transform
# inside ``update``.
# ------------------------------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def check_positive(
    method: str, name: str, value: Any, *, schedule: bool = True, fix: str = ""
) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite number ``> 0`` (or, with
    ``schedule``, a schedule of the step count); ``TypeError`` for a value of another type."""
    if _is_array(value) or (schedule and callable(value)):
        return
    what = "a positive number" + (" or a schedule of the step count" if schedule else "")
    if not is_number(value):
        raise TypeError(f"{method}: {name} must be {what}, got {value!r}. {fix}".rstrip())
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{method}: {name} must be {what}, got {value!r}. {fix}".rstrip())


def check_damping(method: str, value: Any, *, schedule: bool = True) -> None:
    """:func:`check_positive` for ``damping``, with the usual fix in the message."""
    check_positive(
        method,
        "damping",
        value,
        schedule=schedule,
        fix="Damping is added to the curvature before it is inverted and must be > 0; "
        "pass e.g. damping=1e-3 (larger values give smaller, safer steps).",
    )


def check_positive_int(method: str, name: str, value: Any, *, what: str = "") -> None:
    """Raises ``ValueError`` unless ``value`` is a Python int ``>= 1`` (a static argument:
    it sets array shapes or the Python control flow, so it cannot be traced)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < 1:
        raise ValueError(
            f"{method}: {name} must be a positive int (static), got {value!r}. "
            f"Pass an int >= 1{what}; list {name} in static_args of optax.inject_hyperparams."
        )


def check_fraction(method: str, name: str, value: Any, *, static: bool = False) -> None:
    """Raises ``ValueError`` unless ``0 <= value < 1`` (a decay or momentum coefficient).

    With ``static`` the value must also be a Python number (it switches state buffers on/off).
    """
    if _is_array(value) and not static:
        return
    if not is_number(value) or not 0.0 <= value < 1.0:
        kind = "a (static) number" if static else "a number"
        raise ValueError(
            f"{method}: {name} must be {kind} in [0, 1), got {value!r}. Use 0 to switch it "
            "off; 1 or more would never forget old values (or let them grow without bound)."
        )


def check_choice(method: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``allowed``."""
    if isinstance(value, str) or value is None or isinstance(value, (bool, int)):
        ok = value in tuple(allowed)
    else:
        ok = False
    if not ok:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{method}: {name} must be one of {options}; got {value!r}.")


# ------------------------------------------------------------------------------------------------
# Checks of the statistics at trace time.
# ------------------------------------------------------------------------------------------------


def check_layer_stats(method: str, layer_stats: Any) -> None:
    """Checks that ``layer_stats`` is a dict of :class:`LayerStats` whose arrays have the shapes
    their ``meta`` says (``a``: ``(B, T, d_in)`` or ``(B, T)`` ids; ``g``, ``g_sampled``, ``h``:
    ``(B, T, d_out)``; ``g_exact``: ``(c, B, T, d_out)``). Raises ``TypeError`` or
    ``ValueError`` naming the layer. Runs on shapes only (arrays, tracers or
    ``jax.ShapeDtypeStruct``)."""
    fix = (
        "Pass the statistics captured for this model and these parameters, unmodified, e.g. "
        "layer_stats=kfqn_jax.flax.value_grads_and_stats(model, params, x, ...).stats."
    )
    if not isinstance(layer_stats, Mapping):
        raise TypeError(
            f"{method}: layer_stats must be the dict of LayerStats returned in Captured.stats, "
            f"got {type(layer_stats).__name__}. {fix}"
        )
    for key, s in layer_stats.items():
        if not isinstance(s, LayerStats) or not isinstance(s.meta, LayerMeta):
            raise TypeError(
                f"{method}: layer_stats[{key!r}] must be a kfqn_jax.LayerStats with its meta, "
                f"got {type(s).__name__}. {fix}"
            )
        m = s.meta
        a_shape = tuple(np.shape(s.a))
        g_shape = tuple(np.shape(s.g))
        where = f"{method}: layer {m.name!r} (kernel {tuple(m.kernel_shape)} at {m.kernel_path})"
        rows = 2 if m.kind == "embed" else 3
        if len(a_shape) != rows or (rows == 3 and a_shape[-1] != m.in_features):
            want = "(batch, positions)" if rows == 2 else f"(batch, positions, {m.in_features})"
            raise ValueError(f"{where}: inputs `a` have shape {a_shape}, expected {want}. {fix}")
        want_g = a_shape[:2] + (m.out_features,)
        if g_shape != want_g:
            raise ValueError(
                f"{where}: output cotangents `g` have shape {g_shape}, expected {want_g} (the "
                f"batch and positions of `a`, then the {m.out_features} outputs). {fix}"
            )
        for field in ("g_sampled", "h"):
            v = getattr(s, field)
            if v is not None and tuple(np.shape(v)) != g_shape:
                raise ValueError(
                    f"{where}: `{field}` has shape {tuple(np.shape(v))}, expected {g_shape} "
                    f"(the shape of `g`). {fix}"
                )
        if s.g_exact is not None and tuple(np.shape(s.g_exact))[1:] != g_shape:
            raise ValueError(
                f"{where}: `g_exact` has shape {tuple(np.shape(s.g_exact))}, expected "
                f"(columns,) + {g_shape}. {fix}"
            )


def check_tree_like(method: str, name: str, tree: Any, like: Any, like_name: str) -> list:
    """The leaves of ``tree`` in the order of ``like``'s leaves, after checking that ``tree`` has
    the structure and leaf shapes of ``like``; ``ValueError`` naming the first mismatch."""
    treedef = jax.tree.structure(like)
    try:
        leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{method}: {name} must have the tree structure of the {like_name} "
            f"({treedef}), got {jax.tree.structure(tree)}. Compute it from the same parameter "
            f"tree the {like_name} come from. ({e})"
        ) from e
    paths = tree_paths(like)
    for path, leaf, ref in zip(paths, leaves, jax.tree.leaves(like), strict=True):
        if tuple(np.shape(leaf)) != tuple(np.shape(ref)):
            raise ValueError(
                f"{method}: {name} at {path} has shape {tuple(np.shape(leaf))}, but the "
                f"{like_name} there have shape {tuple(np.shape(ref))}. Compute it from the "
                f"same parameters and model."
            )
    return leaves
