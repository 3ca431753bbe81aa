"""One builder for every method's alias: ``scale_by_*`` plus weight decay and a learning rate.

Every alias (``kfac``, ``kbfgs``, ``tnt``, ...) is

.. code-block:: text

    chain([add_decayed_weights(l2_reg)], scale_by_method, [add_decayed_weights(weight_decay,
          mask)], scale_by_learning_rate(learning_rate))

with one meaning per name in every method:

* ``weight_decay`` is *decoupled* decay (as in ``optax.adamw``): ``τ θ`` is added to the
  preconditioned direction, so the update is ``θ ← θ − α (Δ + τ θ)``; ``weight_decay_mask``
  selects the parameters it applies to (``optax.add_decayed_weights``' ``mask``).
* ``l2_reg`` is *coupled* L2 regularisation: ``λ₂ θ`` is added to the gradient before it is
  preconditioned (the objective gains ``λ₂/2 |θ|²``), as in the K-BFGS, KFAC and SMW papers.
  Methods whose curvature model includes the regulariser (SMW's damping, HF's CG system and
  reduction ratio) also receive it in their ``scale_by_*``.

``update(..., warm_start=True)`` reaches only the method's own transform (which folds a batch
of statistics into its state) and returns zero updates, whatever the decay.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

#: Methods whose ``weight_decay`` meant coupled L2 before release 0.2.
COUPLED_BEFORE_0_2 = ("kfac", "kbfgs", "kbfgs_l", "smw_ng", "smw_gn")


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def warn_if_decoupled_changed(method: str, weight_decay: Any) -> None:
    """A ``FutureWarning`` (for one release) where ``weight_decay`` changed meaning; only for
    a concrete non-zero number (``optax.inject_hyperparams`` passes traced values)."""
    concrete = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool)
    if method in COUPLED_BEFORE_0_2 and concrete and weight_decay != 0:
        warnings.warn(
            f"{method}: weight_decay is decoupled weight decay (added after preconditioning, "
            f"as in optax.adamw) since kfqn_jax 0.2; before, it was a coupled L2 term added "
            f"to the gradient. For the old behaviour pass l2_reg={weight_decay!r} instead.",
            FutureWarning,
            stacklevel=3,
        )


def with_warm_start(
    chain: optax.GradientTransformationExtraArgs, inner: Any, index: int
) -> optax.GradientTransformationExtraArgs:
    """Wraps an ``optax.chain`` so that ``update(..., warm_start=True)`` only folds statistics
    into the state of its element ``index`` (``inner``) and returns zero updates."""

    def update_fn(updates, state, params=None, *, warm_start=False, **extra):
        if not warm_start:
            return chain.update(updates, state, params, **extra)
        states = list(state)
        _, states[index] = inner.update(updates, states[index], params, warm_start=True, **extra)
        # Zero updates whatever the inner transform returns (a method without a warm-start
        # mode takes its normal step there; nothing of it reaches the parameters).
        return jax.tree.map(jnp.zeros_like, updates), tuple(states)

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def build(
    method: str,
    scale_by: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
    l2_reg: Any = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """``chain([add_decayed_weights(l2_reg)], scale_by, [add_decayed_weights(weight_decay,
    weight_decay_mask)], scale_by_learning_rate(learning_rate))``, with ``warm_start``
    forwarded to ``scale_by`` alone (see the module docstring).

    Args:
      method: the alias's name, for the warning where ``weight_decay`` changed meaning.
      scale_by: the method's ``scale_by_*`` transform.
      learning_rate: a scalar or a schedule of the step count.
      weight_decay: decoupled weight decay ``τ`` (scalar or schedule).
      weight_decay_mask: which parameters ``weight_decay`` applies to (a tree of bools or a
        function of the parameters), as ``optax.add_decayed_weights``' ``mask``.
      l2_reg: coupled L2 coefficient ``λ₂``, added to the gradient before ``scale_by``.
    """
    warn_if_decoupled_changed(method, weight_decay)
    parts = []
    if not _is_zero(l2_reg):
        parts.append(optax.add_decayed_weights(l2_reg))
    index = len(parts)
    parts.append(scale_by)
    if not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return with_warm_start(optax.chain(*parts), scale_by, index)
