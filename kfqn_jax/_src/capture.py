"""One forward, one or two VJPs: loss, gradients and per-layer statistics.

The framework-specific parts (linen interceptors, NNX class patches) provide a forward function
``fwd(params, probes) -> (outputs, raw)`` whose ``probes`` are zeros added to every captured
layer's output. Here the VJP of the loss with respect to ``(params, probes)`` gives the
gradient and each layer's output cotangent ``g``; a second cotangent, for targets sampled from
the model's predictive distribution, reuses the same forward (no second forward pass).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.base import LayerMeta, LayerStats

SAMPLED_MODES = (None, "cotangents", "grads", "both")


class Captured(NamedTuple):
    """What :func:`kfqn_jax.flax.value_grads_and_stats` returns.

    Attributes:
      loss: the batch-mean training loss (scalar).
      aux: dict with ``outputs`` (the model outputs) and ``mutated`` (updated mutable
        collections, e.g. ``batch_stats``; NNX: the updated non-parameter state).
      grads: gradient of ``loss`` w.r.t. the parameters (same tree as the parameters).
      stats: ``dict[str, LayerStats]``, one entry per captured layer, in call order.
      sampled_grads: gradient of the loss on sampled targets (``sampled`` in
        ``("grads", "both")``), else ``None``.
      sampled_targets: the sampled targets, or ``None``.
      stats_fn: a zero-argument function returning ``stats`` with the sampled-label
        cotangents, computing the second VJP only when called. Pass it as
        ``layer_stats=out.stats_fn`` to a method that refreshes its statistics every few steps
        (``stats_every > 1``): the method calls it inside its ``lax.cond``, so the
        sampled-label backward pass runs only on statistics steps. It is not part of the
        pytree: ``jax.tree`` functions and ``jit`` outputs drop it (it comes back ``None``).
    """

    loss: jax.Array
    aux: dict
    grads: Any
    stats: dict
    sampled_grads: Any = None
    sampled_targets: Any = None
    stats_fn: Any = None


# Captured is a pytree of its arrays only: ``stats_fn`` is a closure over the trace that made it,
# so it is dropped on flattening (it comes back as ``None``). A capture can then be returned from
# ``jax.jit``/``nnx.jit`` and mapped over with ``jax.tree.map`` like any array container.
_ARRAY_FIELDS = tuple(f for f in Captured._fields if f != "stats_fn")


def _flatten_captured_with_keys(c: Captured):
    return tuple((jax.tree_util.GetAttrKey(f), getattr(c, f)) for f in _ARRAY_FIELDS), None


def _flatten_captured(c: Captured):
    return tuple(getattr(c, f) for f in _ARRAY_FIELDS), None


def _unflatten_captured(_, children) -> Captured:
    return Captured(**dict(zip(_ARRAY_FIELDS, children, strict=True)))


jax.tree_util.register_pytree_with_keys(
    Captured,
    _flatten_captured_with_keys,
    _unflatten_captured,
    flatten_func=_flatten_captured,
)


def check_sampled(sampled: Any) -> None:
    if sampled not in SAMPLED_MODES:
        raise ValueError(
            f"sampled must be one of {SAMPLED_MODES}, got {sampled!r}: 'cotangents' adds the "
            "sampled-label output cotangents to the statistics (KFAC true Fisher), 'grads' "
            "returns the sampled-label parameter gradient (TNT), 'both' does both."
        )


def _btd_like(a: jax.Array, h: jax.Array) -> jax.Array:
    """Reshapes a layer output or its cotangent to ``(B, T, d_out)`` matching the input rows
    ``a`` (``(B, T, d_in)``, or ``(B, T)`` ids for embeddings).

    Every captured layer maps each row of ``a`` to one output row, and its output keeps the
    (flattened) batch and position axes in the order ``a`` has them, so one reshape fits all
    kinds: several batch axes of a convolution, unbatched inputs, ``DenseGeneral`` axes.
    """
    return h.reshape(a.shape[0], a.shape[1], -1)


def _check_rows(meta: LayerMeta, a: Any) -> None:
    want = 2 if meta.kind == "embed" else 3
    if a is None or np.ndim(a) != want:
        raise ValueError(
            f"Layer {meta.name!r}: its captured inputs have shape {np.shape(a)}, not the "
            f"{want}-d rows of one call. This happens for layers run under a lifted transform "
            "(nn.scan, nn.vmap) that stacks the capture's collections. Statistics of scanned or "
            "vmapped layers are not supported: unroll the layers (a Python loop), or use "
            "kfqn_jax.tnt/shampoo, which need no capture."
        )


def assemble_stats(
    metas: dict, raw: dict, g_probes: Any, g_probes_s: Any, probe_get
) -> dict[str, LayerStats]:
    """Builds ``LayerStats`` per layer from the recorded inputs/outputs and probe cotangents.

    ``raw[path]`` lists one ``(a, h)`` per call of the layer (``h`` is ``None`` unless outputs
    were recorded); the calls of a shared layer are concatenated along the position axis.
    """
    stats = {}
    for path, meta in metas.items():
        per_call = raw[path]
        for a, _ in per_call:
            _check_rows(meta, a)

        def cat(get, per_call=per_call):
            parts = [_btd_like(a, get(i)) for i, (a, _) in enumerate(per_call)]
            return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

        a_list = [a for a, _ in per_call]
        a = a_list[0] if len(a_list) == 1 else jnp.concatenate(a_list, axis=1)
        g = cat(lambda i, path=path: probe_get(g_probes, path, i))
        gs = None
        if g_probes_s is not None:
            gs = cat(lambda i, path=path: probe_get(g_probes_s, path, i))
        h = None
        if per_call[0][1] is not None:
            h = cat(lambda i, per_call=per_call: per_call[i][1])
        stats[meta.name] = LayerStats(a=a, g=g, g_sampled=gs, h=h, meta=meta)
    return stats


def masked_conv_message(name: str) -> str:
    """The error for a ``Conv`` with a kernel ``mask`` (linen and NNX)."""
    return (
        f"{name}: a Conv with a kernel `mask` is not supported by the capture (its gradient is "
        "the masked product, which the Kronecker statistics do not see). Use an unmasked Conv, "
        "or kfqn_jax.tnt/shampoo, which need no capture."
    )


def exact_cotangents(loss: losses_lib.Loss, outputs: jax.Array) -> jax.Array:
    """Cotangents ``(c, *outputs.shape)`` of the mean loss for the ``c`` columns of the
    per-example Hessian square root: their outer products sum to the exact expectation of the
    sampled-label outer product (the exact Fisher for these losses)."""
    sqrt_h = loss.hessian_sqrt(jax.lax.stop_gradient(outputs))  # (..., c, c)
    n = 1
    for d in outputs.shape[:-1]:
        n *= d
    return jnp.moveaxis(sqrt_h, -1, 0) / n


def exact_stats(stats: dict, metas: dict, raw: dict, g_probes_e: Any, probe_get) -> dict:
    """Adds ``g_exact`` (leading axis over Hessian-root columns) to assembled stats."""
    import dataclasses

    out = dict(stats)
    for path, meta in metas.items():
        per = []
        for i, (a, _) in enumerate(raw[path]):
            per.append(
                jax.vmap(lambda gp, i=i, a=a, path=path: _btd_like(a, probe_get(gp, path, i)))(
                    g_probes_e
                )
            )
        g_exact = per[0] if len(per) == 1 else jnp.concatenate(per, axis=2)
        out[meta.name] = dataclasses.replace(out[meta.name], g_exact=g_exact)
    return out


def check_kernel_shapes(metas: dict, params: Any, get_leaf) -> None:
    for meta in metas.values():
        leaf = get_leaf(params, meta.kernel_path)
        if leaf is None:
            raise ValueError(
                f"Captured layer {meta.name!r} has no parameter at {meta.kernel_path}; pass the "
                "parameter tree the model was applied with."
            )
        if tuple(np.shape(leaf)) != tuple(meta.kernel_shape):
            raise ValueError(
                f"Layer {meta.name!r}: parameter {meta.kernel_path} has shape "
                f"{tuple(np.shape(leaf))} but one call of the layer uses {meta.kernel_shape}. "
                "This happens for layers stacked by nn.scan/nn.vmap (a leading layer axis); "
                "their statistics are not supported: unroll the layers, or use "
                "kfqn_jax.tnt/shampoo, which need no capture."
            )


def grads_and_stats(
    vjp_fn, outputs, loss, targets, rng, sampled, exact_fisher, metas, raw, probe_get
):
    """The backward half of a capture, shared by linen and NNX.

    Given ``vjp_fn`` of the forward ``(params, probes) -> outputs``, returns ``(loss value,
    grads, stats, sampled_grads, sampled_targets, stats_fn)``: one VJP for the training
    targets, one for sampled targets when ``sampled`` is set, ``c`` vmapped VJPs for the
    exact-Fisher cotangents, and ``stats_fn`` that redoes the sampled VJP on demand.
    """
    value, cot, cot_s, sampled_targets = loss_and_cotangents(loss, outputs, targets, rng, sampled)
    grads, g_probes = vjp_fn(cot)
    g_probes_s = sampled_grads = None
    if cot_s is not None:
        sampled_grads, g_probes_s = vjp_fn(cot_s)
        if sampled == "grads":
            g_probes_s = None
        if sampled == "cotangents":
            sampled_grads = None
    stats = assemble_stats(metas, raw, g_probes, g_probes_s, probe_get)
    g_probes_e = None
    if exact_fisher:
        _, g_probes_e = jax.vmap(vjp_fn)(exact_cotangents(loss, outputs))
        stats = exact_stats(stats, metas, raw, g_probes_e, probe_get)

    def stats_fn():
        if cot_s is None:
            return stats
        _, gps = vjp_fn(cot_s)
        lazy = assemble_stats(metas, raw, g_probes, gps, probe_get)
        if g_probes_e is not None:
            lazy = exact_stats(lazy, metas, raw, g_probes_e, probe_get)
        return lazy

    return value, grads, stats, sampled_grads, sampled_targets, stats_fn


def loss_and_cotangents(
    loss: losses_lib.Loss, outputs: Any, targets: Any, rng: Any, sampled: Any
) -> tuple[jax.Array, Any, Any, Any]:
    """Loss value, its cotangent w.r.t. outputs, and the sampled-label cotangent (or None)."""
    value, cot = jax.value_and_grad(lambda o: loss(o, targets))(outputs)
    cot_s = sampled_targets = None
    if sampled is not None:
        if rng is None:
            raise ValueError(
                f"sampled={sampled!r} needs `rng` (a jax.random key) to sample targets from "
                "the model's predictive distribution."
            )
        sampled_targets = loss.sample(rng, outputs)
        cot_s = jax.grad(lambda o: loss(o, sampled_targets))(outputs)
    return value, cot, cot_s, sampled_targets
