"""Statistics capture for Flax linen models through method interceptors.

No edit to the user's model: ``nn.intercept_methods`` wraps every call of ``Dense``,
``DenseGeneral``, ``Conv`` and ``Embed``. The interceptor ``sow``s the layer input (as
``(B, T, d_in)`` patches/rows, see :mod:`kfqn_jax._src.layers`) and optionally the layer output
into a private collection, and ``perturb``s the output with a zero probe so that the VJP with
respect to the probe is the output cotangent ``g``. One forward and one VJP per cotangent give
gradients and statistics together.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from kfqn_jax._src import capture as cap
from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.base import LayerMeta

COL_INPUTS = "kfqn_inputs"
COL_PROBES = "kfqn_probes"

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed)


@dataclasses.dataclass
class _Recorder:
    """Python-side bookkeeping of one traced forward pass."""

    with_outputs: bool = False
    calls: dict = dataclasses.field(default_factory=lambda: collections.OrderedDict())
    metas: dict = dataclasses.field(default_factory=dict)


def _dense_general_axes(mod: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    """The contracted input axes, sorted: Flax orders the kernel's input axes by input axis,
    whatever the order of ``axis`` (``axis=(-1, -2)`` gives the same kernel as ``(-2, -1)``)."""
    axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
    return tuple(sorted(int(a) % ndim for a in axis))


def _prepare(mod: nn.Module, x: Any, path: tuple[str, ...]) -> tuple[Any, LayerMeta]:
    """Layer input in ``(B, T, d_in)`` form (``(B, T)`` ids for ``Embed``) and the static meta.

    The layer output is reshaped to ``(B, T, d_out)`` to match (``capture._btd_like``).
    """
    name = "/".join(path)
    if isinstance(mod, nn.Embed):
        ids = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
        meta = LayerMeta(
            name=name,
            kind="embed",
            kernel_path=path + ("embedding",),
            bias_path=None,
            kernel_shape=(mod.num_embeddings, mod.features),
            n_in_axes=1,
        )
        return ids, meta
    if isinstance(mod, nn.Conv):
        if getattr(mod, "mask", None) is not None:
            raise ValueError(cap.masked_conv_message(name))
        a, meta = layers_lib.conv_inputs(
            x,
            name=name,
            path=path,
            kernel_size=mod.kernel_size,
            strides=mod.strides,
            padding=mod.padding,
            input_dilation=mod.input_dilation,
            kernel_dilation=mod.kernel_dilation,
            feature_group_count=mod.feature_group_count,
            features=mod.features,
            use_bias=mod.use_bias,
        )
        return a, meta
    if isinstance(mod, nn.DenseGeneral):
        if mod.batch_dims:
            raise ValueError(
                f"{name}: DenseGeneral with batch_dims={mod.batch_dims} has one kernel per "
                "batch index and is not supported by the capture; use kfqn_jax.tnt."
            )
        axes = _dense_general_axes(mod, x.ndim)
        if len(axes) == x.ndim:  # an unbatched input
            x = x[None]
            axes = tuple(a + 1 for a in axes)
        if 0 in axes:
            raise ValueError(f"{name}: DenseGeneral contracting the batch axis is not supported.")
        features = mod.features if isinstance(mod.features, (tuple, list)) else (mod.features,)
        in_shape = tuple(x.shape[a] for a in axes)
        perm = [i for i in range(x.ndim) if i not in axes] + list(axes)
        xm = x.transpose(perm)
        d_in = int(np.prod(in_shape))
        a = xm.reshape(xm.shape[0], -1, d_in)
        meta = LayerMeta(
            name=name,
            kind="dense",
            kernel_path=path + ("kernel",),
            bias_path=path + ("bias",) if mod.use_bias else None,
            kernel_shape=in_shape + tuple(int(f) for f in features),
            n_in_axes=len(in_shape),
        )
        return a, meta
    # nn.Dense
    meta = LayerMeta(
        name=name,
        kind="dense",
        kernel_path=path + ("kernel",),
        bias_path=path + ("bias",) if mod.use_bias else None,
        kernel_shape=(x.shape[-1], mod.features),
        n_in_axes=1,
    )
    return layers_lib.to_btd(x), meta


def make_interceptor(rec: _Recorder):
    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, _SUPPORTED):
            return next_fun(*args, **kwargs)
        if mod.scope is None:
            return next_fun(*args, **kwargs)
        path = tuple(mod.scope.path)
        x = args[0] if args else kwargs.get("inputs")
        out = next_fun(*args, **kwargs)
        idx = rec.calls.get(path, 0)
        a, meta = _prepare(mod, x, path)
        rec.calls[path] = idx + 1
        prev = rec.metas.get(path)
        if prev is not None and prev.kernel_shape != meta.kernel_shape:
            raise ValueError(f"{meta.name}: calls with different kernel shapes.")
        rec.metas[path] = dataclasses.replace(meta, num_calls=idx + 1)
        mod.sow(COL_INPUTS, f"a{idx}", a, reduce_fn=lambda _, v: v, init_fn=lambda: None)
        if rec.with_outputs:
            mod.sow(COL_INPUTS, f"h{idx}", out, reduce_fn=lambda _, v: v, init_fn=lambda: None)
        return mod.perturb(f"g{idx}", out, collection=COL_PROBES)

    return interceptor


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


_LIFTED_MSG = (
    "Statistics of scanned or vmapped layers are not supported by kfqn_jax capture: unroll "
    "the layers (a Python loop), or use kfqn_jax.tnt/shampoo, which need no capture."
)


def _as_mutable(mutable: Any) -> Any:
    """``apply``'s ``mutable`` argument as a list of collections, or ``True`` for all."""
    if mutable is True:
        return True
    if mutable is False or mutable is None:
        return []
    if isinstance(mutable, str):
        return [mutable]
    return list(mutable)


def linen_forward(model: nn.Module, with_outputs: bool, method: Any, apply_kwargs: dict):
    """Builds ``fwd(variables, probes, inputs, mutable) -> (outputs, (raw, mutated, probes))``
    and a recorder.

    ``raw`` maps layer path to a list of per-call ``(a, h)`` tuples. With ``probes=None`` the
    probe collection is created (zeros shaped like the layer outputs) and returned.
    """
    rec = _Recorder(with_outputs=with_outputs)

    def fwd(variables, probes, inputs, mutable):
        rec.calls.clear()
        rec.metas.clear()
        variables = dict(variables)
        if probes is not None:
            variables[COL_PROBES] = probes
        mutable = _as_mutable(mutable)
        if mutable is True:
            mut = True
        else:
            mut = [COL_INPUTS] + mutable
            if probes is None:
                mut.append(COL_PROBES)
        try:
            with nn.intercept_methods(make_interceptor(rec)):
                out, mutated = model.apply(
                    variables, *inputs, mutable=mut, method=method, **apply_kwargs
                )
        except ValueError as e:
            if COL_PROBES not in str(e):
                raise
            raise ValueError(
                f"The capture's probes ({COL_PROBES!r}) did not reach a layer: it runs under a "
                f"lifted transform (nn.scan, nn.vmap, ...) that lists the capture's collections "
                f"in its variable_axes. {_LIFTED_MSG}"
            ) from e
        mutated = dict(mutated)
        captured = mutated.pop(COL_INPUTS, {})
        new_probes = mutated.pop(COL_PROBES, None)
        raw = {}
        for path, n_calls in rec.calls.items():
            node = _get(captured, path)
            meta = rec.metas[path]
            if node is None:
                raise ValueError(
                    f"Layer {meta.name!r} ran, but its captured statistics did not come back: "
                    "it runs under a lifted transform (nn.scan, nn.vmap, nn.map_variables, ...) "
                    f"that drops unknown collections. {_LIFTED_MSG}"
                )
            per_call = []
            for i in range(n_calls):
                a = node.get(f"a{i}")
                h = node.get(f"h{i}") if with_outputs else None
                per_call.append((a, h))
            raw[path] = per_call
        return out, (raw, mutated, new_probes)

    return fwd, rec


def _probe_get(probes: Any, path: tuple[str, ...], i: int) -> Any:
    return _get(probes, path)[f"g{i}"]


def _split_variables(params: Any, extra_variables: Any) -> tuple[Any, dict]:
    extra = dict(extra_variables or {})
    if "params" in extra:
        raise ValueError("Pass the parameters as `params`, not inside `extra_variables`.")
    return params, extra


def _zero_probes(fwd, params: Any, extra: dict, inputs: tuple, mutable: Any) -> Any:
    """Zero probes shaped like every captured layer output (no computation: ``eval_shape``)."""

    def shapes_fn(p):
        _, (_, _, probes) = fwd({"params": p, **extra}, None, inputs, mutable)
        return probes

    probe_shapes = jax.eval_shape(shapes_fn, params)
    probes = jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), probe_shapes)
    return probes if probes is not None else {}


def value_grads_and_stats(
    model: nn.Module,
    params: Any,
    *inputs: Any,
    targets: Any,
    loss: Any,
    rng: Any = None,
    sampled: str | None = None,
    with_outputs: bool = False,
    exact_fisher: bool = False,
    extra_variables: Any = None,
    mutable: Any = (),
    method: Any = None,
    **apply_kwargs: Any,
):
    """Loss, gradients and per-layer statistics of a linen model in one forward pass.

    The model runs once under ``nn.intercept_methods``; the VJP of the batch-mean loss with
    respect to the parameters and to zero probes on every captured layer output gives the
    gradient and the output cotangents ``g``. With ``sampled`` set, a second VJP of the same
    forward, on targets drawn from the model's predictive distribution, gives the
    sampled-label cotangents (true Fisher) and/or the sampled-label gradient.

    Args:
      model: a ``flax.linen.Module``.
      params: the ``variables["params"]`` tree.
      *inputs: positional inputs of ``model.apply``.
      targets: training targets for ``loss`` (for an autoencoder, the inputs).
      loss: a :class:`kfqn_jax.losses.Loss` (or its name) applied to the model outputs.
      rng: a ``jax.random`` key, needed when ``sampled`` is set.
      sampled: ``None``, ``"cotangents"`` (KFAC), ``"grads"`` (TNT) or ``"both"``.
      exact_fisher: also return ``g_exact``: cotangents for the columns of the loss
        Hessian's square root (one VJP per model output, batched with ``vmap``; for models
        with few outputs). KFAC with ``fisher="exact"`` uses them.
      with_outputs: also record every layer's output (pre-activation) ``h`` (K-BFGS).
      extra_variables: other collections passed to ``apply`` (e.g. ``batch_stats``).
      mutable: collections that ``apply`` may update; they come back in ``aux["mutated"]``.
      method: forwarded to ``model.apply``.
      **apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=True``, ``rngs=...``).

    Returns:
      A :class:`Captured` named tuple ``(loss, aux, grads, stats, sampled_grads,
      sampled_targets)``.
    """
    cap.check_sampled(sampled)
    loss = losses_lib.as_loss(loss)
    params, extra = _split_variables(params, extra_variables)
    mutable = _as_mutable(mutable)
    fwd, rec = linen_forward(model, with_outputs, method, apply_kwargs)
    probes = _zero_probes(fwd, params, extra, inputs, mutable)

    def f(p, pr):
        out, (raw, mutated, _) = fwd({"params": p, **extra}, pr, inputs, mutable)
        return out, (raw, mutated)

    outputs, vjp_fn, (raw, mutated) = jax.vjp(f, params, probes, has_aux=True)
    metas = dict(rec.metas)
    cap.check_kernel_shapes(metas, params, _get)
    value, grads, stats, sampled_grads, sampled_targets, stats_fn = cap.grads_and_stats(
        vjp_fn, outputs, loss, targets, rng, sampled, exact_fisher, metas, raw, _probe_get
    )
    aux = {"outputs": outputs, "mutated": mutated}
    return cap.Captured(value, aux, grads, stats, sampled_grads, sampled_targets, stats_fn)


def layer_stats(
    model: nn.Module,
    params: Any,
    *inputs: Any,
    targets: Any,
    loss: Any,
    with_outputs: bool = True,
    extra_variables: Any = None,
    mutable: Any = (),
    method: Any = None,
    **apply_kwargs: Any,
) -> dict:
    """Per-layer statistics only (no parameter gradient): one forward and a cotangent-only VJP.

    This is the trial-point pass of K-BFGS; its cost is a forward plus the backward through the
    activations, without the weight-gradient products. ``mutable`` lets a model that updates
    collections in training mode (``BatchNorm`` batch statistics) run; the updates are
    discarded.
    """
    loss = losses_lib.as_loss(loss)
    params, extra = _split_variables(params, extra_variables)
    mutable = _as_mutable(mutable)
    fwd, rec = linen_forward(model, with_outputs, method, apply_kwargs)
    probes = _zero_probes(fwd, params, extra, inputs, mutable)

    def f(pr):
        out, (raw, _, _) = fwd({"params": params, **extra}, pr, inputs, mutable)
        return out, raw

    outputs, vjp_fn, raw = jax.vjp(f, probes, has_aux=True)
    metas = dict(rec.metas)
    cap.check_kernel_shapes(metas, params, _get)
    _, cot, _, _ = cap.loss_and_cotangents(loss, outputs, targets, None, None)
    (g_probes,) = vjp_fn(cot)
    return cap.assemble_stats(metas, raw, g_probes, None, _probe_get)


def layer_metas(
    model: nn.Module,
    params: Any,
    *inputs: Any,
    extra_variables: Any = None,
    mutable: Any = (),
    method: Any = None,
    **apply_kwargs: Any,
) -> tuple[LayerMeta, ...]:
    """Static descriptions of the layers the capture sees (traced with ``jax.eval_shape``, no
    computation). Pass them as ``layers=`` to a method to make its curvature blocks exact.
    ``mutable`` as in :func:`value_grads_and_stats` (needed by models with ``BatchNorm`` in
    training mode)."""
    params, extra = _split_variables(params, extra_variables)
    fwd, rec = linen_forward(model, False, method, apply_kwargs)
    jax.eval_shape(lambda p: fwd({"params": p, **extra}, None, inputs, mutable)[0], params)
    return tuple(rec.metas.values())
