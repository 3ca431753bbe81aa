"""Training helpers for Flax: a ``TrainState`` that forwards extra args, and train steps.

``flax.training.train_state.TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
params)`` with no extra arguments, so methods that need per-layer statistics cannot run through
it. :class:`TrainState` here forwards them. :func:`make_train_step` (linen) and
:func:`make_nnx_train_step` (NNX) build the whole jittable step (capture, transform, parameter
update); by default they ask the transform what it needs (:func:`kfqn_jax.requirements`), so
switching method is a one-line change of ``tx``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import nnx, struct
from flax.training import train_state

from kfqn_jax._src import capture_linen, capture_nnx, extra_args
from kfqn_jax._src import losses as losses_lib
from kfqn_jax._src.smw import OutputProbe

#: The extra arguments the train steps can build (all but ``sq_grads``).
NEEDS = tuple(n for n in extra_args.ALL if n != extra_args.SQ_GRADS)
#: ``sampled=AUTO`` (the default) takes the capture option from the transform's requirements.
AUTO = "auto"


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards extra args.

    Attributes:
      extra_variables: the model's non-parameter collections (e.g. ``{"batch_stats": ...}``),
        passed to ``apply`` by :func:`make_train_step` and replaced by their updates.
    """

    extra_variables: Any = struct.field(pytree_node=True, default_factory=dict)

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """One optimizer step: ``tx.update(grads, opt_state, params, **extra_args)``.

        Keyword arguments named like a field of the state (``extra_variables``, or fields of a
        subclass) replace that field, as in Flax; all others are extra arguments of
        ``tx.update`` (``layer_stats=...``, ``sampled_grads=...``, ``loss_fn=...``).

        Returns:
          The new state, with ``step`` incremented and ``params``/``opt_state`` updated.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        replace = {k: v for k, v in kwargs.items() if k in fields}
        extra = {k: v for k, v in kwargs.items() if k not in fields}
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        new_params = optax.apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **replace
        )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one train step captures and passes: the resolved requirements."""

    needs: tuple[str, ...]
    sampled: str | None
    with_outputs: bool
    exact_fisher: bool


def _check_explicit(needs: Sequence[str] | None, sampled: Any) -> None:
    if needs is not None:
        unknown = [n for n in needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"needs: unknown extra args {unknown}; choose from {NEEDS}.")
        if extra_args.SAMPLED_GRADS in needs and sampled not in ("grads", "both"):
            raise ValueError(
                "needs includes 'sampled_grads': set sampled='grads' (or 'both') so that the "
                "capture computes the gradient on sampled targets."
            )
    if sampled != AUTO and sampled not in extra_args.SAMPLED:
        raise ValueError(
            f"sampled must be 'auto' or one of {extra_args.SAMPLED}, got {sampled!r}."
        )


def _plan(tx, params, needs, sampled, with_outputs, exact_fisher) -> _Plan:
    """Explicit arguments where given, the transform's declared requirements elsewhere."""
    # With explicit `needs` and `sampled` nothing is asked (a transform of the user's that
    # cannot answer still runs); unset capture options then default to off.
    auto = needs is None or sampled == AUTO
    reqs = extra_args.requirements(tx, params) if auto else extra_args.Requirements()
    if needs is None:
        needs = reqs.extra_args
        unbuildable = [n for n in needs if n not in NEEDS]
        if unbuildable:
            raise ValueError(
                f"the transform needs {unbuildable}, which the train step cannot build; "
                "write the step by hand and pass them to tx.update."
            )
    if sampled == AUTO:
        sampled = reqs.sampled
        if extra_args.SAMPLED_GRADS in needs and sampled in (None, "cotangents"):
            sampled = "both" if sampled == "cotangents" else "grads"
    return _Plan(
        needs=tuple(needs),
        sampled=sampled,
        with_outputs=reqs.with_outputs if with_outputs is None else bool(with_outputs),
        exact_fisher=reqs.exact_fisher if exact_fisher is None else bool(exact_fisher),
    )


def _leading_rows(inputs: tuple, n: int) -> tuple:
    return tuple(jax.tree.map(lambda z: z[:n], x) for x in inputs)


def _extra_args(plan, params, inputs, y, loss, out, apply, stats_at) -> dict:
    """The extra arguments ``plan.needs`` asks for, from a capture ``out`` and the two
    functions of the Flax API at hand: ``apply(params, inputs) -> outputs`` and
    ``stats_at(params, inputs, targets, loss, with_outputs) -> layer statistics``."""
    builders = {
        extra_args.LAYER_STATS: lambda: out.stats,
        extra_args.SAMPLED_GRADS: lambda: out.sampled_grads,
        extra_args.STATS_FN: lambda: lambda p: stats_at(p, inputs, y, loss, plan.with_outputs),
        extra_args.LOSS_FN: lambda: lambda p: loss(apply(p, inputs), y),
        extra_args.MODEL_FN: lambda: lambda p: apply(p, inputs),
        extra_args.OUTPUT_LOSS: lambda: loss,
        extra_args.MODEL_OUTPUTS: lambda: out.aux["outputs"],
        extra_args.PROBE_STATS_FN: lambda: lambda v: stats_at(
            params, _leading_rows(inputs, v.shape[0]), v, OutputProbe(), False
        ),
    }
    return {name: builders[name]() for name in plan.needs}


def _linen_extra_args(plan, model, params, inputs, y, loss, out, extra, mutable, method, kwargs):
    """The extra arguments ``plan.needs`` asks for, built from a linen capture."""

    def apply(p, xs):
        variables = {"params": p, **extra}
        if mutable:
            return model.apply(variables, *xs, mutable=mutable, method=method, **kwargs)[0]
        return model.apply(variables, *xs, method=method, **kwargs)

    def stats_at(p, xs, targets, lss, with_outputs):
        return capture_linen.layer_stats(
            model, p, *xs, targets=targets, loss=lss, with_outputs=with_outputs,
            extra_variables=extra, mutable=mutable, method=method, **kwargs,
        )  # fmt: skip

    return _extra_args(plan, params, inputs, y, loss, out, apply, stats_at)


def make_train_step(
    model: nn.Module,
    loss: Any,
    tx: optax.GradientTransformation | None = None,
    *,
    sampled: str | None = AUTO,
    with_outputs: bool | None = None,
    exact_fisher: bool | None = None,
    needs: Sequence[str] | None = None,
    mutable: Any = (),
    rng_streams: Sequence[str] = (),
    method: Any = None,
    **apply_kwargs: Any,
) -> Callable[[Any, Any, Any, Any], tuple[Any, jax.Array]]:
    """A jittable ``train_step(state, x, y, rng) -> (state, loss)`` for a linen model.

    The step captures loss, gradients and per-layer statistics in one forward pass
    (:func:`kfqn_jax.flax.value_grads_and_stats`), gives the transform the extra arguments it
    needs, and applies the update. ``loss`` is the training loss *before* the update. What
    the transform needs is read from it (:func:`kfqn_jax.requirements`, which sees through
    ``optax.chain``, ``optax.inject_hyperparams`` and ``optax.MultiSteps``), so any kfqn_jax
    method, alone or chained with optax transforms, trains with the same call::

        tx = optax.chain(optax.clip_by_global_norm(1.0), kfqn_jax.kbfgs(0.1))
        state = kfqn_jax.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        step = jax.jit(kfqn_jax.flax.make_train_step(model, "softmax_cross_entropy"))
        state, loss = step(state, x, y, jax.random.key(0))

    Args:
      model: a ``flax.linen.Module``.
      loss: a :class:`kfqn_jax.losses.Loss` or its name.
      tx: the transform to call; defaults to ``state.tx`` (it must be the one that created
        ``state.opt_state``). ``state`` may be a :class:`TrainState` or a plain Flax one.
      sampled: ``"auto"`` (default: as the transform requires), or explicitly ``None``,
        ``"cotangents"`` (KFAC's true Fisher), ``"grads"`` (TNT) or ``"both"``, as in
        :func:`kfqn_jax.flax.value_grads_and_stats`.
      with_outputs: record layer outputs ``h`` (K-BFGS); ``None``: as required.
      exact_fisher: capture ``g_exact`` (KFAC ``fisher="exact"``); ``None``: as required.
      needs: the extra arguments to pass to ``tx.update``; ``None`` (default): those the
        transform declares. Any of ``"layer_stats"``, ``"sampled_grads"``, ``"stats_fn"``
        (statistics at other parameters on the same batch), ``"loss_fn"`` (the loss at other
        parameters on the same batch), ``"model_fn"`` (the model outputs at other
        parameters), ``"output_loss"`` (the loss object), ``"model_outputs"`` (the outputs
        on the batch) and ``"probe_stats_fn"`` (SMW-GN's output-probe statistics on the
        leading rows of the batch).
      mutable: collections the model updates in training (e.g. ``["batch_stats"]``); they
        are read from and written back to ``state.extra_variables``.
      rng_streams: names of Flax RNG streams (e.g. ``("dropout",)``) fed from the step's
        ``rng``.
      method: forwarded to ``model.apply``.
      **apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=True``).

    Returns:
      ``train_step(state, x, y, rng) -> (new_state, loss)``; ``x`` is the model input (a
      tuple for several positional inputs) and ``y`` the targets.
    """
    _check_explicit(needs, sampled)
    loss = losses_lib.as_loss(loss)
    mutable = capture_linen._as_mutable(mutable)
    if mutable is True:
        raise ValueError("mutable=True is not supported here: list the collections.")

    def train_step(state: Any, x: Any, y: Any, rng: Any):
        t = tx if tx is not None else state.tx
        plan = _plan(t, state.params, needs, sampled, with_outputs, exact_fisher)
        inputs = x if isinstance(x, tuple) else (x,)
        extra = dict(getattr(state, "extra_variables", None) or {})
        kwargs = dict(apply_kwargs)
        sample_rng = rng
        if rng_streams:
            keys = jax.random.split(rng, len(rng_streams) + 1)
            sample_rng = keys[0]
            kwargs["rngs"] = {name: k for name, k in zip(rng_streams, keys[1:], strict=True)}
        out = capture_linen.value_grads_and_stats(
            model, state.params, *inputs, targets=y, loss=loss,
            rng=sample_rng if plan.sampled is not None else None, sampled=plan.sampled,
            with_outputs=plan.with_outputs, exact_fisher=plan.exact_fisher,
            extra_variables=extra, mutable=mutable, method=method, **kwargs,
        )  # fmt: skip
        args = _linen_extra_args(
            plan, model, state.params, inputs, y, loss, out, extra, mutable, method, kwargs
        )
        replace = {}
        if hasattr(state, "extra_variables"):
            replace["extra_variables"] = {**extra, **out.aux["mutated"]}
        if tx is None and isinstance(state, TrainState):
            return state.apply_gradients(grads=out.grads, **replace, **args), out.loss
        # An explicit tx, or a plain flax TrainState (whose apply_gradients drops extra args).
        updates, opt_state = t.update(out.grads, state.opt_state, state.params, **args)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            **replace,
        )
        return new_state, out.loss

    return train_step


def _nnx_extra_args(plan, model, params, inputs, y, loss, out, wrt, call):
    """The extra arguments ``plan.needs`` asks for, built from an NNX capture."""
    graphdef, _, rest = nnx.split(model, wrt, ...)

    def apply(p, xs):
        return (call or capture_nnx._default_call)(nnx.merge(graphdef, p, rest), *xs)

    def stats_at(p, xs, targets, lss, with_outputs):
        return capture_nnx.nnx_layer_stats(
            model, p, *xs, targets=targets, loss=lss, with_outputs=with_outputs, wrt=wrt,
            call=call,
        )  # fmt: skip

    return _extra_args(plan, params, inputs, y, loss, out, apply, stats_at)


def make_nnx_train_step(
    loss: Any,
    *,
    sampled: str | None = AUTO,
    with_outputs: bool | None = None,
    exact_fisher: bool | None = None,
    needs: Sequence[str] | None = None,
    wrt: Any = nnx.Param,
    call: Callable[..., Any] | None = None,
) -> Callable[[Any, Any, Any, Any, Any], jax.Array]:
    """The NNX twin of :func:`make_train_step`: ``train_step(model, optimizer, x, y, rng) ->
    loss`` for an ``nnx.Module`` and its ``nnx.Optimizer``, to wrap in ``nnx.jit``.

    The step captures with :func:`kfqn_jax.flax.nnx_value_grads_and_stats`, builds the extra
    arguments ``optimizer.tx`` declares (see :func:`make_train_step`; explicit arguments
    override), and calls ``optimizer.update(model, grads, **extra_args)``::

        optimizer = nnx.Optimizer(model, kfqn_jax.tnt(1e-3), wrt=nnx.Param)
        step = nnx.jit(kfqn_jax.flax.make_nnx_train_step("softmax_cross_entropy"))
        loss = step(model, optimizer, x, y, jax.random.key(0))

    Args:
      loss: a :class:`kfqn_jax.losses.Loss` or its name.
      sampled, with_outputs, exact_fisher, needs: as in :func:`make_train_step`.
      wrt: the variable filter of ``nnx.Optimizer`` (default ``nnx.Param``).
      call: optional ``call(model, *inputs) -> outputs`` for models not called directly.

    Returns:
      ``train_step(model, optimizer, x, y, rng) -> loss`` (the loss before the update); ``x``
      is the model input (a tuple for several positional inputs) and ``y`` the targets.
    """
    _check_explicit(needs, sampled)
    loss = losses_lib.as_loss(loss)

    def train_step(model: Any, optimizer: Any, x: Any, y: Any, rng: Any) -> jax.Array:
        params = nnx.state(model, wrt)
        plan = _plan(optimizer.tx, params, needs, sampled, with_outputs, exact_fisher)
        inputs = x if isinstance(x, tuple) else (x,)
        out = capture_nnx.nnx_value_grads_and_stats(
            model, *inputs, targets=y, loss=loss,
            rng=rng if plan.sampled is not None else None, sampled=plan.sampled,
            with_outputs=plan.with_outputs, exact_fisher=plan.exact_fisher, wrt=wrt, call=call,
        )  # fmt: skip
        args = _nnx_extra_args(plan, model, params, inputs, y, loss, out, wrt, call)
        optimizer.update(model, out.grads, **args)
        return out.loss

    return train_step
