"""Statistics capture for Flax NNX models.

NNX has no method interceptors. During the capture's own forward pass, ``__call__`` of
``nnx.Linear``, ``nnx.Conv`` and ``nnx.Embed`` is temporarily wrapped (class-level, restored
on exit) to record layer inputs and add a zero probe to the outputs; only module instances that
belong to the model being captured are affected. The model is split into parameters and the
rest, and merged inside a pure function, so the VJP gives gradients and output cotangents
together, as for linen.

Layers that run inside an NNX or JAX transform within the model (``nnx.scan``, ``nnx.vmap``,
``nnx.remat``, ``jax.checkpoint``, ...) are not supported and raise a ``ValueError`` (such
transforms call copies of the modules at an inner trace level, whose statistics cannot leave the
transform). A layer outside the model that runs at the capture's own trace level (e.g. a frozen
module closed over by ``call``) is passed through and gets no statistics.

Caveat: the class-level wrap is not thread-safe; do not trace two captures concurrently from
different Python threads.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.core
import jax.extend
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from kfqn_jax._src import capture as cap
from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.base import LayerMeta, tree_paths

_SUPPORTED = (nnx.Linear, nnx.Conv, nnx.Embed)


def _prepare(mod: Any, x: Any, path: tuple[Any, ...]):
    name = "/".join(str(p) for p in path)
    if isinstance(mod, nnx.Embed):
        ids = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
        meta = LayerMeta(
            name=name,
            kind="embed",
            kernel_path=tuple(path) + ("embedding",),
            bias_path=None,
            kernel_shape=tuple(mod.embedding.shape),
            n_in_axes=1,
        )
        return ids, meta
    if isinstance(mod, nnx.Conv):
        if getattr(mod, "mask", None) is not None:
            raise ValueError(cap.masked_conv_message(name))
        return layers_lib.conv_inputs(
            x,
            name=name,
            path=path,
            kernel_size=mod.kernel_size,
            strides=mod.strides,
            padding=mod.padding,
            input_dilation=mod.input_dilation,
            kernel_dilation=mod.kernel_dilation,
            feature_group_count=mod.feature_group_count,
            features=mod.out_features,
            use_bias=mod.use_bias,
        )
    meta = LayerMeta(
        name=name,
        kind="dense",
        kernel_path=tuple(path) + ("kernel",),
        bias_path=tuple(path) + ("bias",) if mod.use_bias else None,
        kernel_shape=(mod.in_features, mod.out_features),
        n_in_axes=1,
    )
    return layers_lib.to_btd(x), meta


_TRANSFORM_MSG = (
    "{what} ran inside a JAX/NNX transform (nnx.scan, nnx.vmap, nnx.remat, jax.checkpoint, "
    "...) within the model. Statistics of such layers are not supported: unroll them, or use "
    "kfqn_jax.tnt/shampoo, which need no capture."
)


# JAX >= 0.10 has this in jax.extend.core (jax.core's copy is deprecated there); JAX 0.9 has
# it only in jax.core.
_get_opaque_trace_state = getattr(jax.extend.core, "get_opaque_trace_state", None) or (
    jax.core.get_opaque_trace_state
)


def _trace_state() -> Any:
    return _get_opaque_trace_state(convention="nnx")


class _Recorder:
    def __init__(self, with_outputs: bool):
        self.with_outputs = with_outputs
        self.paths: dict[int, tuple[Any, ...]] = {}
        self.metas: dict = {}
        self.raw: dict = {}
        self.out_shapes: dict = {}
        self.probes: Any = None
        self.trace: Any = None

    def reset(self, model: Any, probes: Any) -> None:
        self.paths = {
            id(node): tuple(path)
            for path, node in nnx.iter_graph(model)
            if isinstance(node, _SUPPORTED)
        }
        self.metas, self.raw, self.out_shapes = {}, {}, {}
        self.probes = probes
        self.trace = _trace_state()

    def call(self, orig, mod, x, *args, **kwargs):
        out = orig(mod, x, *args, **kwargs)
        path = self.paths.get(id(mod))
        if _trace_state() != self.trace:
            # A transform inside the model calls the layer (NNX transforms call copies of the
            # model's modules, so their ids are unknown here): its statistics would be lost.
            what = (
                f"Layer {'/'.join(str(p) for p in path)!r}"
                if path
                else (f"A {type(mod).__name__} layer")
            )
            raise ValueError(_TRANSFORM_MSG.format(what=what))
        if path is None:  # not part of the captured model (e.g. a frozen module)
            return out
        calls = self.raw.setdefault(path, [])
        idx = len(calls)
        a, meta = _prepare(mod, x, path)
        self.metas[path] = LayerMeta(**{**meta.__dict__, "num_calls": idx + 1})
        calls.append((a, out if self.with_outputs else None))
        key = f"{meta.name}#{idx}"
        self.out_shapes[key] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        if self.probes is not None:
            out = out + self.probes[key]
        return out


@contextlib.contextmanager
def _patched(rec: _Recorder):
    originals = {cls: cls.__dict__["__call__"] for cls in _SUPPORTED}

    def make(cls, orig):
        @functools.wraps(orig)
        def wrapped(self, inputs, *args, **kwargs):
            return rec.call(orig, self, inputs, *args, **kwargs)

        return wrapped

    try:
        for cls, orig in originals.items():
            cls.__call__ = make(cls, orig)
        yield
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def _forward(model, wrt, with_outputs, call):
    graphdef, params, rest = nnx.split(model, wrt, ...)
    rec = _Recorder(with_outputs)

    def fwd(p, probes, inputs, rest=rest):
        m = nnx.merge(graphdef, p, rest)
        rec.reset(m, probes)
        try:
            with _patched(rec):
                out = call(m, *inputs)
        except jax.errors.UnexpectedTracerError as e:
            raise ValueError(_TRANSFORM_MSG.format(what="A captured NNX layer")) from e
        new_rest = nnx.split(m, wrt, ...)[2]
        return out, (rec.raw, new_rest)

    return fwd, rec, params


def _rest_of(model, wrt):
    return nnx.split(model, wrt, ...)[2]


def _probe_get(probes, path, i):
    name = "/".join(str(p) for p in path)
    return probes[f"{name}#{i}"]


def _get_leaf(params, path):
    paths = tree_paths(params)
    leaves = jax.tree_util.tree_leaves(params)
    for p, leaf in zip(paths, leaves, strict=True):
        if p == tuple(path):
            return leaf
    return None


def _default_call(m, *inputs):
    return m(*inputs)


def nnx_value_grads_and_stats(
    model: Any,
    *inputs: Any,
    targets: Any,
    loss: Any,
    rng: Any = None,
    sampled: str | None = None,
    with_outputs: bool = False,
    exact_fisher: bool = False,
    wrt: Any = nnx.Param,
    call: Any = None,
) -> cap.Captured:
    """Loss, gradients (an ``nnx.State`` of ``wrt`` variables) and per-layer statistics of an
    NNX model, from one forward pass and one VJP per cotangent.

    Non-parameter state the forward pass changes (batch statistics, RNG counters) is written
    back into ``model`` (the NNX convention) and also returned as ``aux["mutated"]``.

    Args:
      model: an ``nnx.Module``.
      *inputs: inputs of ``model(*inputs)`` (or of ``call(model, *inputs)``).
      targets: training targets for ``loss``.
      loss: a :class:`kfqn_jax.losses.Loss` or its name.
      rng: a ``jax.random`` key, needed when ``sampled`` is set.
      sampled: ``None``, ``"cotangents"``, ``"grads"`` or ``"both"`` (see the linen version).
      exact_fisher: also return ``g_exact``: cotangents for the columns of the loss
        Hessian's square root (one VJP per model output, batched with ``vmap``; for models
        with few outputs). KFAC with ``fisher="exact"`` uses them.
      with_outputs: also record layer outputs ``h``.
      wrt: the variable filter differentiated (default ``nnx.Param``), as in ``nnx.Optimizer``.
      call: optional ``call(model, *inputs) -> outputs`` for models not called directly.

    Returns:
      :class:`kfqn_jax.flax.Captured`; ``grads`` has the structure of ``nnx.state(model, wrt)``,
      ready for ``nnx.Optimizer.update(model, grads, layer_stats=captured.stats)``.
    """
    cap.check_sampled(sampled)
    loss = losses_lib.as_loss(loss)
    call = call or _default_call
    fwd, rec, params = _forward(model, wrt, with_outputs, call)
    jax.eval_shape(lambda p, r: fwd(p, None, inputs, r)[0], params, _rest_of(model, wrt))
    probes = {k: jnp.zeros(s.shape, s.dtype) for k, s in rec.out_shapes.items()}
    # The non-parameter state enters as a (non-differentiated) argument so that NNX sees it at
    # the trace level of the VJP and allows in-place updates such as batch statistics.
    rest = _rest_of(model, wrt)
    outputs, vjp_fn_all, (raw, new_rest) = jax.vjp(
        lambda p, pr, r: fwd(p, pr, inputs, r), params, probes, rest, has_aux=True
    )

    def vjp_fn(c):
        g, gp, _ = vjp_fn_all(c)
        return g, gp

    metas = dict(rec.metas)
    cap.check_kernel_shapes(metas, params, _get_leaf)
    value, grads, stats, sampled_grads, sampled_targets, stats_fn = cap.grads_and_stats(
        vjp_fn, outputs, loss, targets, rng, sampled, exact_fisher, metas, raw, _probe_get
    )
    nnx.update(model, new_rest)
    aux = {"outputs": outputs, "mutated": new_rest}
    return cap.Captured(value, aux, grads, stats, sampled_grads, sampled_targets, stats_fn)


def nnx_layer_stats(
    model: Any,
    params: Any,
    *inputs: Any,
    targets: Any,
    loss: Any,
    with_outputs: bool = True,
    wrt: Any = nnx.Param,
    call: Any = None,
) -> dict:
    """Per-layer statistics of an NNX model at the parameters ``params`` (an ``nnx.State`` of
    ``wrt`` variables, e.g. a trial point), from one forward and a cotangent-only VJP; the NNX
    twin of :func:`kfqn_jax.flax.layer_stats`. The model itself is not changed: state the
    forward pass would update (batch statistics) is discarded."""
    loss = losses_lib.as_loss(loss)
    fwd, rec, _ = _forward(model, wrt, with_outputs, call or _default_call)
    rest = _rest_of(model, wrt)
    jax.eval_shape(lambda p, r: fwd(p, None, inputs, r)[0], params, rest)
    probes = {k: jnp.zeros(s.shape, s.dtype) for k, s in rec.out_shapes.items()}
    outputs, vjp_fn, (raw, _) = jax.vjp(
        lambda pr: fwd(params, pr, inputs, rest), probes, has_aux=True
    )
    metas = dict(rec.metas)
    cap.check_kernel_shapes(metas, params, _get_leaf)
    _, cot, _, _ = cap.loss_and_cotangents(loss, outputs, targets, None, None)
    (g_probes,) = vjp_fn(cot)
    return cap.assemble_stats(metas, raw, g_probes, None, _probe_get)


def nnx_layer_metas(model: Any, *inputs: Any, wrt: Any = nnx.Param, call: Any = None):
    """Static layer descriptions of an NNX model (no computation; ``jax.eval_shape``)."""
    fwd, rec, params = _forward(model, wrt, False, call or _default_call)
    jax.eval_shape(lambda p, r: fwd(p, None, inputs, r)[0], params, _rest_of(model, wrt))
    return tuple(rec.metas.values())
