"""Levenberg-Marquardt damping: one controller for SMW-NG/GN and (block) Hessian-free.

After a step ``d`` whose quadratic model predicted the decrease ``pred > 0``, the reduction
ratio is ``ρ = (f(θ) − f(θ + d)) / pred``. The damping ``λ`` grows by ``increase`` when
``ρ < low`` (the model was too optimistic), shrinks by the same factor when ``ρ > high``, and
stays otherwise; it is kept in ``[floor, ceiling]``. Martens (2010, §4.1) uses ``low = 1/4``,
``high = 3/4`` and ``increase = 3/2``; Ren & Goldfarb (2019) use the same rule with their own
factor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

#: Martens' (2010) thresholds and factor.
MARTENS_THRESHOLDS = (0.25, 0.75)
MARTENS_FACTOR = 1.5
#: Default bounds of the adaptive damping.
MIN_DAMPING, MAX_DAMPING = 1e-8, 1e8


def reduction_ratio(current: jax.Array, trial: jax.Array, predicted: jax.Array) -> jax.Array:
    """``ρ = (current − trial) / predicted``, or ``-inf`` when the loss rose, the model
    predicted no decrease (``predicted <= 0``) or either value is not finite (a step to
    reject)."""
    actual = current - trial
    good = (actual >= 0) & (predicted > 0) & jnp.isfinite(actual) & jnp.isfinite(predicted)
    return jnp.where(good, actual / jnp.where(predicted > 0, predicted, 1.0), -jnp.inf)


@dataclasses.dataclass(frozen=True)
class LevenbergMarquardt:
    """The damping rule of the module docstring.

    Attributes:
      low, high: the thresholds on ``ρ``.
      factor: ``λ`` is multiplied by it below ``low`` and divided by it above ``high``.
      floor, ceiling: the bounds of ``λ``.
    """

    low: float = MARTENS_THRESHOLDS[0]
    high: float = MARTENS_THRESHOLDS[1]
    factor: float = MARTENS_FACTOR
    floor: float = MIN_DAMPING
    ceiling: float = MAX_DAMPING

    def update(self, lam: jax.Array, rho: jax.Array) -> jax.Array:
        """The next damping from the current one and the step's reduction ratio (a NaN ``ρ``
        counts as a failed step; a non-finite result keeps ``lam``)."""
        factor = jnp.asarray(self.factor, lam.dtype)
        grow = (rho < self.low) | jnp.isnan(rho)
        new = jnp.where(grow, lam * factor, jnp.where(rho > self.high, lam / factor, lam))
        new = jnp.clip(new, self.floor, self.ceiling).astype(lam.dtype)
        return jnp.where(jnp.isfinite(new), new, lam)
