"""Non-finite guard shared by every method (the ``on_nonfinite`` argument).

A training step can meet non-finite numbers in the gradients, in the statistics passed as extra
args, or create them itself (an overflowing factor, a failed inverse). Every method's
``update`` is wrapped by :func:`guard_nonfinite`, which, depending on ``on_nonfinite``:

* ``"skip"`` (default): if the incoming gradients, the produced updates or the produced state
  hold a NaN or an infinity, the step is skipped: ``update`` returns zero updates and the *old*
  state, with its ``nonfinite_count`` incremented. Nothing else of the state moves: ``count``
  counts the steps actually taken, so periodic refreshes and schedules of the method keep
  their phase. The check is one boolean reduction and a select, inside the compiled step (no
  host sync). Non-finite statistics are caught through what they produce: every statistic a
  method reads ends up in its new state or its updates (a NaN in a layer input makes that
  layer's factor NaN), while a field the method never reads is harmless and does not skip the
  step. The check itself is cheap (about 1% of a step); the select between the new and the
  old state is a memory pass over the whole state (7-16% of a step on a CPU,
  ``benchmarks/RESULTS.md``). KFAC, TNT and K-BFGS (both variants) therefore do not use
  this wrapper for ``"skip"``: they gate their own state updates with the flag inside the
  operations that make them.
* ``"raise"``: the same check, and a ``FloatingPointError`` raised from the device through
  ``jax.debug.callback``. Outside ``jit`` it propagates as is; under ``jit`` JAX reports it as
  a ``jax.errors.JaxRuntimeError`` whose message contains the ``FloatingPointError`` text,
  when the step runs (on asynchronous backends, at the latest when its results are read). The
  returned values, if any, are those of ``"skip"``.
* ``"ignore"``: no check; non-finite values flow into the state and the updates.

Functions passed as extra args (``stats_fn``, ``loss_fn``, ``model_fn``) cannot be checked
before they run; what they return reaches the new state or the updates, which are checked.
Transforms chained after the method (decoupled weight decay, the learning rate) still run on a
skipped step: with ``add_decayed_weights`` after the method, a skipped step still decays the
weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfqn_jax._src import base, linalg

ON_NONFINITE = ("skip", "raise", "ignore")

# The ``on_nonfinite`` entry of every ``scale_by_*`` docstring's Args section.
ON_NONFINITE_DOC = (
    "on_nonfinite: what a step does when the gradients, the statistics it is given, or\n"
    '        the updates and state it produces hold a NaN or an infinity: ``"skip"``\n'
    "        (default) returns zero updates and the previous state with ``nonfinite_count``\n"
    '        incremented (so ``count`` does not advance either); ``"raise"`` raises a\n'
    "        ``FloatingPointError`` from the device (under ``jit``, surfaced by JAX as a\n"
    '        ``jax.errors.JaxRuntimeError`` carrying that message); ``"ignore"`` does not\n'
    "        check."
)


def check_on_nonfinite(method: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is one of :data:`ON_NONFINITE`."""
    base.check_choice(method, "on_nonfinite", value, ON_NONFINITE)


def _float_leaves(tree: Any) -> list:
    """The floating-point (or complex) array leaves of ``tree``; functions, loss objects and
    integer arrays are left out."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic, float)) and not isinstance(
            leaf, bool
        ):
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                out.append(leaf)
    return out


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` if ``ok`` else ``old``, leaf by leaf (typed PRNG keys through their key data)."""
    dtype = jnp.result_type(new)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(ok, new, old).astype(dtype)


def select_tree(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` if ``ok`` else ``old``, leaf by leaf (a skipped step keeps the old state)."""
    return jax.tree.map(functools.partial(_select, ok), new, old)


def _raise_nonfinite(
    method: str, names: tuple[str, ...], grads_ok: Any, extra_ok: Any, out_ok: Any
) -> None:
    if bool(grads_ok) and bool(extra_ok) and bool(out_ok):
        return
    where = []
    if not bool(grads_ok):
        where.append("the incoming gradients")
    if not bool(extra_ok):
        where.append("the extra args " + ", ".join(f"`{n}`" for n in names))
    if not bool(out_ok):
        where.append("the updates or state this step produced")
    raise FloatingPointError(
        f"{method}: non-finite values (NaN or Inf) in {' and '.join(where)}. Build the "
        "optimizer with on_nonfinite='skip' to skip such steps (counted in "
        "state.nonfinite_count), lower the learning rate or raise the damping, or locate the "
        "source with jax.config.update('jax_debug_nans', True)."
    )


def guard_nonfinite(
    update_fn: Callable[..., tuple[Any, Any]],
    on_nonfinite: str,
    method: str,
    checked: Sequence[str] = (),
    init_fn: Callable[[Any], Any] | None = None,
    fused: bool = False,
) -> Callable[..., tuple[Any, Any]]:
    """Wraps a method's ``update_fn`` with the non-finite check described in the module
    docstring.

    Args:
      update_fn: ``(updates, state, params=None, **extra) -> (updates, state)`` of a
        ``scale_by_*`` transform whose state is a NamedTuple with an int32 field
        ``nonfinite_count``, carried over unchanged by ``update_fn``.
      on_nonfinite: ``"skip"``, ``"raise"`` or ``"ignore"`` (checked here, at construction).
      method: the method's name, for messages.
      checked: names of the extra args whose floating-point arrays are checked (functions
        among them are skipped).
      init_fn: the transform's ``init``. When given, an incoming state whose tree structure
        differs from what ``init`` builds for these updates (``flax.nnx.Optimizer`` hands the
        state back with its containers converted to NNX ones) is rebuilt in the canonical
        structure from its leaves before ``update_fn`` runs.
      fused: ``update_fn`` implements ``"skip"`` itself, gating its state updates inside the
        operations that make them (with :func:`ema_finite` and :func:`finish_skip`); for
        ``"skip"`` only the state canonicalisation is added, no select over the state.

    Returns:
      The guarded update function (``update_fn`` itself for ``"ignore"``).
    """
    check_on_nonfinite(method, on_nonfinite)
    names = tuple(checked)
    if on_nonfinite == "ignore" or (fused and on_nonfinite == "skip"):
        return _with_canonical_state(update_fn, init_fn, method) if init_fn else update_fn

    def guarded(updates, state, params=None, **extra):
        if not hasattr(state, "nonfinite_count"):
            raise TypeError(
                f"{method}: the optimizer state has no nonfinite_count field; it was not "
                f"created by this transform's init."
            )
        state = canonical_state(state, init_fn, updates, method)
        new_updates, new_state = update_fn(updates, state, params, **extra)
        grads_ok = linalg.is_finite(_float_leaves(updates))
        out_ok = linalg.is_finite(_float_leaves((new_updates, new_state)))
        ok = grads_ok & out_ok
        if on_nonfinite == "raise":
            # Only to say where the values came from; "skip" does not read the extra args
            # (a value the method uses shows in its results, one it ignores is harmless).
            extra_ok = linalg.is_finite(_float_leaves([extra.get(n) for n in names]))
            jax.debug.callback(
                functools.partial(_raise_nonfinite, method, names), grads_ok, extra_ok, out_ok
            )
        skipped = state._replace(nonfinite_count=optax.safe_increment(state.nonfinite_count))
        new_state = select_tree(ok, new_state, skipped)
        new_updates = jax.tree.map(
            lambda u: jnp.where(ok, u, jnp.zeros((), jnp.result_type(u))), new_updates
        )
        return new_updates, new_state

    return guarded


def canonical_state(state: Any, init_fn: Callable[[Any], Any] | None, updates: Any, method: str):
    """``state`` rebuilt with the tree structure ``init_fn(updates)`` has, when it differs.

    Containers only: the leaves (arrays) are kept, in order. Raises ``ValueError`` if the leaf
    counts differ (a state that does not belong to this transform and these parameters).
    """
    if init_fn is None:
        return state
    want = jax.tree.structure(jax.eval_shape(init_fn, updates))
    if jax.tree.structure(state) == want:
        return state
    leaves = jax.tree.leaves(state)
    if len(leaves) != want.num_leaves:
        raise ValueError(
            f"{method}: the optimizer state has {len(leaves)} arrays but this transform's init "
            f"makes {want.num_leaves} for these gradients: pass the state created by "
            "tx.init(params) for the same parameter tree."
        )
    return want.unflatten(leaves)


def _with_canonical_state(update_fn, init_fn, method):
    @functools.wraps(update_fn)
    def wrapped(updates, state, params=None, **extra):
        return update_fn(updates, canonical_state(state, init_fn, updates, method), params, **extra)

    return wrapped


def ema_finite(w: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
    """Whether the EMA ``(1 - w) old + w new`` of a Gram statistic is finite, for a fused
    ``"skip"``: a ``(d, d)`` Gram matrix (or the ``(d,)`` vector of its diagonal) is finite
    exactly when its diagonal is (Cauchy-Schwarz, ``|F_ij| <= sqrt(F_ii F_jj)``; a NaN entry
    makes its row's diagonal NaN), so only the ``d`` diagonal entries are computed."""

    def diag(x):
        return jnp.diagonal(x) if x.ndim == 2 else x

    return jnp.all(jnp.isfinite((1 - w) * diag(old) + w * diag(new)))


def finish_skip(
    ok: jax.Array, updates: Sequence[jax.Array], count: jax.Array, nonfinite_count: jax.Array
) -> tuple[list, jax.Array, jax.Array]:
    """The end of a step whose ``"skip"`` is fused into the method.

    ``ok`` says the step's inputs and new curvature were finite (the method has already gated
    its state updates on it). The updates must be finite too: otherwise they are zeroed and the
    step is counted as skipped, the curvature having advanced on finite inputs.

    Returns:
      ``(updates, count, nonfinite_count)``: the update leaves, ``count`` advanced only when
      ``ok``, and the counter of skipped steps.
    """
    ok_all = ok & linalg.is_finite(list(updates))
    updates = [jnp.where(ok_all, u, jnp.zeros((), u.dtype)) for u in updates]
    count = jnp.where(ok, optax.safe_increment(count), count)
    return updates, count, nonfinite_count + (~ok_all).astype(jnp.int32)
