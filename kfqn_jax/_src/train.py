"""Training helpers for Flax linen: a ``TrainState`` that forwards extra args, and a train step.

``flax.training.train_state.TrainState.apply_gradients`` calls ``tx.update(grads, opt_state,
params)`` with no extra arguments, so methods that need per-layer statistics cannot run through
it. :class:`TrainState` here forwards them; :func:`make_train_step` builds the whole jittable
step (capture, transform, parameter update).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import struct
from flax.training import train_state

from kfqn_jax._src import base, capture_linen
from kfqn_jax._src import losses as losses_lib

MODEL_FN = "model_fn"
OUTPUT_LOSS = "output_loss"
NEEDS = (base.LAYER_STATS, base.SAMPLED_GRADS, base.STATS_FN, base.LOSS_FN, MODEL_FN, OUTPUT_LOSS)


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
        extra_args = {k: v for k, v in kwargs.items() if k not in fields}
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        new_params = optax.apply_updates(self.params, updates)
        return self.replace(
            step=self.step + 1, params=new_params, opt_state=new_opt_state, **replace
        )


def make_train_step(
    model: nn.Module,
    loss: Any,
    tx: optax.GradientTransformation | None = None,
    *,
    sampled: str | None = None,
    with_outputs: bool = False,
    exact_fisher: bool = False,
    needs: Sequence[str] = (base.LAYER_STATS,),
    mutable: Any = (),
    rng_streams: Sequence[str] = (),
    method: Any = None,
    **apply_kwargs: Any,
) -> Callable[[TrainState, Any, Any, Any], tuple[TrainState, jax.Array]]:
    """A jittable ``train_step(state, x, y, rng) -> (state, loss)`` for a linen model.

    The step captures loss, gradients and per-layer statistics in one forward pass
    (:func:`kfqn_jax.flax.value_grads_and_stats`), gives the transform the extra arguments it
    ``needs``, and applies the update. ``loss`` is the training loss *before* the update.

    Example::

        tx = kfqn_jax.kfac(learning_rate=0.1)
        state = kfqn_jax.flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        step = jax.jit(kfqn_jax.flax.make_train_step(model, "softmax_cross_entropy",
                                                     sampled="cotangents"))
        state, loss = step(state, x, y, jax.random.key(0))

    Args:
      model: a ``flax.linen.Module``.
      loss: a :class:`kfqn_jax.losses.Loss` or its name.
      tx: the transform to call; defaults to ``state.tx`` (it must be the one that created
        ``state.opt_state``). ``state`` may be a :class:`TrainState` or a plain Flax one.
      sampled: ``None``, ``"cotangents"`` (KFAC's true Fisher), ``"grads"`` (TNT) or
        ``"both"``, as in :func:`kfqn_jax.flax.value_grads_and_stats`.
      with_outputs: record layer outputs ``h`` in the statistics (K-BFGS).
      exact_fisher: capture ``g_exact`` (KFAC ``fisher="exact"``).
      needs: extra arguments to pass to ``tx.update``: any of ``"layer_stats"``,
        ``"sampled_grads"`` (needs ``sampled`` in ``("grads", "both")``), ``"stats_fn"``
        (statistics at other parameters on the same batch), ``"loss_fn"`` (the loss at other
        parameters on the same batch), ``"model_fn"`` (the model outputs at other parameters
        on the same batch) and ``"output_loss"`` (the loss object), as the methods document.
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
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"needs: unknown extra args {unknown}; choose from {NEEDS}.")
    if base.SAMPLED_GRADS in needs and sampled not in ("grads", "both"):
        raise ValueError(
            "needs includes 'sampled_grads': set sampled='grads' (or 'both') so that the "
            "capture computes the gradient on sampled targets."
        )
    loss = losses_lib.as_loss(loss)
    mutable = capture_linen._as_mutable(mutable)
    if mutable is True:
        raise ValueError("mutable=True is not supported here: list the collections.")

    def train_step(state: TrainState, x: Any, y: Any, rng: Any):
        inputs = x if isinstance(x, tuple) else (x,)
        extra = dict(getattr(state, "extra_variables", None) or {})
        kwargs = dict(apply_kwargs)
        sample_rng = rng
        if rng_streams:
            keys = jax.random.split(rng, len(rng_streams) + 1)
            sample_rng = keys[0]
            kwargs["rngs"] = {name: k for name, k in zip(rng_streams, keys[1:], strict=True)}
        out = capture_linen.value_grads_and_stats(
            model,
            state.params,
            *inputs,
            targets=y,
            loss=loss,
            rng=sample_rng if sampled is not None else None,
            sampled=sampled,
            with_outputs=with_outputs,
            exact_fisher=exact_fisher,
            extra_variables=extra,
            mutable=mutable,
            method=method,
            **kwargs,
        )
        extra_args = {}
        if base.LAYER_STATS in needs:
            extra_args[base.LAYER_STATS] = out.stats
        if base.SAMPLED_GRADS in needs:
            extra_args[base.SAMPLED_GRADS] = out.sampled_grads
        if base.STATS_FN in needs:
            extra_args[base.STATS_FN] = lambda p: capture_linen.layer_stats(
                model,
                p,
                *inputs,
                targets=y,
                loss=loss,
                with_outputs=with_outputs,
                extra_variables=extra,
                mutable=mutable,
                method=method,
                **kwargs,
            )

        def model_fn(p):
            variables = {"params": p, **extra}
            if mutable:
                outputs, _ = model.apply(
                    variables, *inputs, mutable=mutable, method=method, **kwargs
                )
                return outputs
            return model.apply(variables, *inputs, method=method, **kwargs)

        if base.LOSS_FN in needs:
            extra_args[base.LOSS_FN] = lambda p: loss(model_fn(p), y)
        if MODEL_FN in needs:
            extra_args[MODEL_FN] = model_fn
        if OUTPUT_LOSS in needs:
            extra_args[OUTPUT_LOSS] = loss
        new_extra = {**extra, **out.aux["mutated"]}
        replace = {"extra_variables": new_extra} if hasattr(state, "extra_variables") else {}
        if tx is None and isinstance(state, TrainState):
            new_state = state.apply_gradients(grads=out.grads, **replace, **extra_args)
        else:  # an explicit tx, or a plain flax TrainState (which drops extra args)
            t = tx if tx is not None else state.tx
            updates, opt_state = t.update(out.grads, state.opt_state, state.params, **extra_args)
            new_state = state.replace(
                step=state.step + 1,
                params=optax.apply_updates(state.params, updates),
                opt_state=opt_state,
                **replace,
            )
        return new_state, out.loss

    return train_step
