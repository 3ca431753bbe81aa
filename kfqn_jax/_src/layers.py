"""Per-layer-kind reshaping: layer inputs to ``(B, T, d_in)``, conv patches, kernel matrices.

Conventions
-----------
A weight leaf reshapes to the kernel matrix ``W`` of shape ``(d_in, d_out)`` (Flax layout:
inputs on the left), by splitting its axes after ``meta.n_in_axes``. A layer computes
``h = a W (+ b)`` for every example and position, so the weight gradient of the batch-mean loss
is ``sum_{b,t} a[b,t]^T g[b,t]``. With a bias the homogeneous form ``[W; b]`` of shape
``(d_in + 1, d_out)`` pairs with ``[a, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kfqn_jax._src.base import ConvSpec, LayerMeta, LayerStats, tree_paths

Array = jax.Array

_CONV_DIMNUMS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _tuple(v: Any, n: int, name: str) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    if len(v) != n:
        raise ValueError(f"Conv {name} {v} does not match {n} spatial dimensions.")
    return v


def canonical_conv_padding(
    padding: Any, kernel_size: Sequence[int], kernel_dilation: Sequence[int]
) -> tuple[str | tuple[tuple[int, int], ...], Any]:
    """Returns ``(lax_padding, pre_pad)`` for a Flax conv ``padding`` argument.

    ``pre_pad`` is ``None`` or ``(mode, pads)`` for the modes Flax implements by padding the
    input first (``CIRCULAR``, ``REFLECT``, ``CAUSAL``), in which case ``lax_padding`` is
    ``"VALID"``.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        p = padding.upper()
        if p in ("SAME", "SAME_LOWER", "VALID"):
            return p, None
        if p in ("CIRCULAR", "REFLECT"):
            eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
            pads = [((e - 1) // 2, e // 2) for e in eff]
            return "VALID", ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[p], pads)
        if p == "CAUSAL":
            if n != 1:
                raise ValueError("CAUSAL padding is only defined for 1-D convolutions.")
            return "VALID", ("constant", [((kernel_size[0] - 1) * kernel_dilation[0], 0)])
        raise ValueError(f"Unsupported conv padding {padding!r}.")
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in range(n)), None
    padding = list(padding)
    if len(padding) != n:
        raise ValueError(f"Conv padding {padding} does not match {n} spatial dimensions.")
    out = []
    for p in padding:
        if isinstance(p, int):
            out.append((p, p))
        else:
            lo, hi = p
            out.append((int(lo), int(hi)))
    return tuple(out), None


def apply_pre_pad(x: Array, pre_pad: Any) -> Array:
    """Pads the spatial axes of ``x`` (``(B, *spatial, C)``) as Flax does before the conv."""
    if pre_pad is None:
        return x
    mode, pads = pre_pad
    widths = [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)]
    return jnp.pad(x, widths, mode=mode)


def conv_patches(x: Array, spec: ConvSpec) -> Array:
    """Patches of ``x`` (``(B, *spatial, C)``) as ``(B, T, prod(kernel_size) * C)``.

    The feature order matches ``kernel.reshape(-1, C_out)`` of a Flax kernel
    ``(k_1, ..., k_n, C, C_out)``. (``lax.conv_general_dilated_patches`` orders features as
    ``(C, k_1, ..., k_n)``; this function reorders them.)
    """
    n = len(spec.kernel_size)
    c = x.shape[-1]
    patches = lax.conv_general_dilated_patches(
        x,
        filter_shape=spec.kernel_size,
        window_strides=spec.strides,
        padding=spec.padding,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=_CONV_DIMNUMS[n],
        precision=lax.Precision.HIGHEST,
    )
    k = int(np.prod(spec.kernel_size))
    b = patches.shape[0]
    t = int(np.prod(patches.shape[1:-1]))
    patches = patches.reshape(b, t, c, k)
    return jnp.swapaxes(patches, -1, -2).reshape(b, t, k * c)


def to_btd(x: Array) -> Array:
    """``(B, ..., d)`` to ``(B, T, d)``; a 1-D input becomes ``(1, 1, d)``."""
    if x.ndim == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def kernel_matrix(kernel: Array, meta: LayerMeta) -> Array:
    """The weight leaf as the ``(d_in, d_out)`` kernel matrix."""
    return kernel.reshape(meta.in_features, meta.out_features)


def homogeneous_grad(kernel: Array, bias: Array | None, meta: LayerMeta) -> Array:
    """``[W; b]`` of shape ``(d_in (+1), d_out)`` from the kernel and bias leaves."""
    w = kernel_matrix(kernel, meta)
    if bias is None:
        return w
    return jnp.concatenate([w, bias.reshape(1, meta.out_features)], axis=0)


def split_homogeneous(mat: Array, meta: LayerMeta) -> tuple[Array, Array | None]:
    """Inverse of :func:`homogeneous_grad`: kernel leaf (original shape) and bias leaf."""
    if meta.has_bias:
        w, b = mat[:-1], mat[-1]
    else:
        w, b = mat, None
    return w.reshape(meta.kernel_shape), b


def append_ones(a: Array) -> Array:
    """``[a, 1]`` along the last axis."""
    # ones_like of a slice keeps ``a``'s sharding (a batch-sharded input stays sharded).
    return jnp.concatenate([a, jnp.ones_like(a[..., :1])], axis=-1)


def check_matrix_inputs(stats: LayerStats) -> None:
    """Raises ``ValueError`` for an embedding, whose recorded inputs are ids."""
    if stats.meta.kind == "embed":
        raise ValueError(f"{stats.meta.name}: embedding inputs are ids, not a matrix.")


def inputs_matrix(stats: LayerStats, homogeneous: bool | None = None) -> Array:
    """Layer inputs ``(B, T, d_in (+1))``, with the homogeneous 1 appended when the layer has a
    bias (or when ``homogeneous`` says so)."""
    check_matrix_inputs(stats)
    if homogeneous is None:
        homogeneous = stats.meta.has_bias
    return append_ones(stats.a) if homogeneous else stats.a


def conv_inputs(
    x: Array,
    *,
    name: str,
    path: tuple[Any, ...],
    kernel_size: Any,
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
    feature_group_count: int,
    features: int,
    use_bias: bool,
) -> tuple[Array, LayerMeta]:
    """Patches ``(B, T, prod(kernel_size) * C_in)`` and the meta of a Flax-style convolution."""
    if feature_group_count != 1:
        raise ValueError(
            f"{name}: grouped/depthwise convolutions (feature_group_count="
            f"{feature_group_count}) have no Kronecker factorisation here; exclude the layer "
            "or use kfqn_jax.tnt, which needs no capture."
        )
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else kernel_size
    kernel_size = tuple(int(k) for k in kernel_size)
    n = len(kernel_size)
    if n not in _CONV_DIMNUMS:
        raise ValueError(f"{name}: only 1-3 spatial dimensions are supported, got {n}.")
    if x.ndim == n + 1:
        x = x[None]
    if x.ndim > n + 2:  # several batch dims, as Flax allows
        x = x.reshape((-1,) + x.shape[-(n + 1) :])
    strides = _tuple(strides, n, "strides")
    in_dil = _tuple(input_dilation, n, "input_dilation")
    k_dil = _tuple(kernel_dilation, n, "kernel_dilation")
    lax_padding, pre_pad = canonical_conv_padding(padding, kernel_size, k_dil)
    x = apply_pre_pad(x, pre_pad)
    spec = ConvSpec(kernel_size, strides, lax_padding, in_dil, k_dil)
    meta = LayerMeta(
        name=name,
        kind="conv",
        kernel_path=tuple(path) + ("kernel",),
        bias_path=tuple(path) + ("bias",) if use_bias else None,
        kernel_shape=kernel_size + (int(x.shape[-1]), int(features)),
        n_in_axes=n + 1,
        conv=spec,
    )
    return conv_patches(x, spec), meta


# ---------------------------------------------------------------------------------------------
# Layers from parameters alone


def infer_layers(params: Any) -> tuple[LayerMeta, ...]:
    """Guesses the Kronecker-factorable layers of a Flax parameter tree from names and shapes.

    Rule: a node with a ``kernel`` leaf of rank >= 2 is a layer whose kernel matrix is
    ``(prod(shape[:-1]), shape[-1])`` (right for ``Dense``, ``Conv`` and ``DenseGeneral`` with a
    single output axis), with the sibling ``bias`` leaf of shape ``(shape[-1],)`` if present.
    Layers for which this guess is wrong (``DenseGeneral`` with several output axes) are
    reported at ``update`` time with the fix: pass ``layers=kfqn_jax.flax.layer_metas(...)``.
    """
    paths = tree_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    shape_of = {p: tuple(np.shape(leaf)) for p, leaf in zip(paths, leaves, strict=True)}
    out = []
    for p, shape in shape_of.items():
        if not p or p[-1] != "kernel" or len(shape) < 2:
            continue
        parent = p[:-1]
        bias = parent + ("bias",)
        bias_path = bias if shape_of.get(bias) == (shape[-1],) else None
        kind = "dense" if len(shape) == 2 else "conv"
        name = "/".join(str(x) for x in parent if x != "params")
        out.append(
            LayerMeta(
                name=name,
                kind=kind,
                kernel_path=p,
                bias_path=bias_path,
                kernel_shape=shape,
                n_in_axes=len(shape) - 1,
            )
        )
    return tuple(out)


def leaf_index(tree: Any) -> tuple[list, dict, Any]:
    """Leaves of ``tree``, a dict from each leaf's path (:func:`tree_paths`) to its index, and
    the treedef, for reading and replacing the kernel/bias leaves of layers."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return leaves, {p: i for i, p in enumerate(tree_paths(tree))}, treedef


def uncovered_mask(tree: Any, metas: Sequence[LayerMeta]) -> Any:
    """A tree of bools like ``tree``: True for leaves that are neither the kernel nor the bias
    of a layer in ``metas`` (the leaves a method's fallback transform handles). Paths match with
    or without a leading ``"params"`` collection key."""
    covered = set()
    for m in metas:
        for p in (m.kernel_path, m.bias_path):
            if p is not None:
                covered.add(tuple(p))
                covered.add(("params",) + tuple(p))
    flags = [p not in covered for p in tree_paths(tree)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), flags)


def resolve_layers(
    params: Any, layers: Sequence[LayerMeta] | Mapping[str, Any] | None, kinds: Sequence[str]
) -> tuple[LayerMeta, ...]:
    """The layers a method preconditions: ``layers`` if given (a sequence of metas or a stats
    dict), else :func:`infer_layers`, keeping only ``kinds`` and checking the paths exist."""
    if layers is None:
        metas = infer_layers(params)
    elif isinstance(layers, Mapping):
        metas = tuple(s.meta if isinstance(s, LayerStats) else s for s in layers.values())
    else:
        metas = tuple(layers)
    metas = tuple(m for m in metas if m.kind in kinds)
    paths = set(tree_paths(params))
    for m in metas:
        for p in (m.kernel_path, m.bias_path):
            if p is None:
                continue
            if p not in paths and ("params",) + tuple(p) not in paths:
                raise ValueError(
                    f"Layer {m.name!r}: parameter path {p} is not in the parameter tree. Pass "
                    "the same tree to init that the capture saw (the linen "
                    "variables['params'] dict, or nnx.state(model, nnx.Param))."
                )
    return metas


def match_stats(method: str, metas: Sequence[LayerMeta], layer_stats: Any) -> list[LayerStats]:
    """The statistics of each block, matched by kernel path, with shape checks."""
    if not isinstance(layer_stats, dict):
        raise TypeError(
            f"{method}: layer_stats must be the dict returned in Captured.stats, got "
            f"{type(layer_stats).__name__}."
        )
    by_path = {}
    for s in layer_stats.values():
        by_path[tuple(s.meta.kernel_path)] = s
        by_path[("params",) + tuple(s.meta.kernel_path)] = s
    out = []
    for m in metas:
        s = by_path.get(tuple(m.kernel_path))
        if s is None:
            raise ValueError(
                f"{method}: no statistics for layer {m.name!r} (parameter {m.kernel_path}). Its "
                "kernel has curvature state but the capture did not see the layer: is it a "
                "Flax Dense/DenseGeneral/Conv (linen) or Linear/Conv (NNX) called in the "
                "forward pass? Pass layers=kfqn_jax.flax.layer_metas(model, params, x) to the "
                "optimizer to precondition exactly the captured layers."
            )
        if (s.meta.in_features, s.meta.out_features, s.meta.has_bias) != (
            m.in_features,
            m.out_features,
            m.has_bias,
        ):
            raise ValueError(
                f"{method}: layer {m.name!r}: the optimizer state was built for a "
                f"{m.in_features}x{m.out_features} kernel matrix (bias={m.has_bias}) guessed "
                f"from the parameter shapes, but the captured layer is "
                f"{s.meta.in_features}x{s.meta.out_features} (bias={s.meta.has_bias}). Pass "
                "layers=kfqn_jax.flax.layer_metas(model, params, x) to the optimizer."
            )
        out.append(s)
    return out
