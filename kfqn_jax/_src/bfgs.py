r"""BFGS and L-BFGS building blocks of the Kronecker-factored quasi-Newton methods.

Everything here works on one curvature pair ``(s, y)`` (vectors of length ``d``) and one inverse
Hessian approximation ``H`` (``d x d``, symmetric positive definite), or an L-BFGS memory of
``L`` pairs. All functions are pure, jittable and branch with ``jnp.where`` only; every division
that is only meaningful inside a branch is guarded so that the branch not taken cannot produce
NaN/Inf.

Inverse BFGS update (Nocedal & Wright 2006, eq. 6.17), with :math:`\rho = 1 / s^\top y`:

.. math::

    H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top
        = H + (\rho^2 y^\top H y + \rho)\, s s^\top - \rho (H y s^\top + s y^\top H),

which satisfies the secant condition :math:`H^+ y = s` and keeps :math:`H^+` positive definite
when :math:`s^\top y > 0`.

Double damping (Goldfarb, Ren & Bahamou 2020), on a copy of the pair:

1. Powell damping on ``H`` with :math:`\mu_1`: with :math:`q = H y`, if
   :math:`s^\top y \le \mu_1 y^\top q`, replace :math:`s \leftarrow \theta_1 s + (1-\theta_1) q`,
   :math:`\theta_1 = (1-\mu_1) y^\top q / (y^\top q - s^\top y)`, so that
   :math:`s^\top y = \mu_1 y^\top H y` afterwards (a lower bound on the eigenvalues of ``H``).
2. ``"2020"``: Powell damping with :math:`B = I` and :math:`\mu_2`: if
   :math:`s^\top y \le \mu_2 s^\top s`, replace :math:`y \leftarrow \theta_2 y + (1-\theta_2) s`,
   :math:`\theta_2 = (1-\mu_2) s^\top s / (s^\top s - s^\top y)`, so that
   :math:`s^\top y = \mu_2 s^\top s` (an upper bound on the eigenvalues of ``H``).
   ``"lm"`` (the later form, Ren, Bahamou & Goldfarb 2021): :math:`y \leftarrow y + \mu_2 s`
   unconditionally (Levenberg-Marquardt damping, :math:`B + \mu_2 I`).

L-BFGS compact inverse form (Byrd, Nocedal & Schnabel 1994, Theorem 2.2), with the ``k`` pairs
as the columns of ``S`` and ``Y`` (oldest first), :math:`R = \operatorname{triu}(S^\top Y)`,
:math:`D = \operatorname{diag}(s_i^\top y_i)` and :math:`H_0 = \gamma I`:

.. math::

    H v = \gamma v + S R^{-\top} (D + \gamma Y^\top Y) R^{-1} S^\top v
          - \gamma (S R^{-\top} Y^\top v + Y R^{-1} S^\top v),

which equals ``k`` recursive BFGS updates of :math:`\gamma I` with the same pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kfqn_jax._src import linalg

__all__ = [
    "DampingInfo",
    "LBFGSMemory",
    "bfgs_inverse_update",
    "double_damping",
    "lbfgs_apply",
    "lbfgs_init",
    "lbfgs_push",
    "powell_damping_h",
    "powell_damping_identity",
    "should_update",
]

_HIGHEST = lax.Precision.HIGHEST


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.dot(x, y, precision=_HIGHEST)


def _safe_div(num: jax.Array, den: jax.Array, default: float) -> jax.Array:
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), default)


# ---------------------------------------------------------------------------------------------
# Dense inverse BFGS.


def bfgs_inverse_update(h: jax.Array, s: jax.Array, y: jax.Array) -> jax.Array:
    r"""One inverse BFGS update, symmetrised (see the module docstring).

    Args:
      h: the current inverse-Hessian approximation :math:`H`, ``(d, d)``, symmetric.
      s: the step :math:`s`, ``(d,)``.
      y: the gradient difference :math:`y`, ``(d,)``; :math:`s^\top y` must be ``> 0`` (the
        caller skips the update otherwise, see :func:`should_update`).

    Returns:
      :math:`\operatorname{sym}(H^+)`, ``(d, d)``. Rounding breaks the exact symmetry of the
      rank-two update, so the result is symmetrised (kazukiosawa/asdl#41).
    """
    hy = _dot(h, y)
    sy = _dot(s, y)
    rho = _safe_div(jnp.ones_like(sy), sy, 0.0)
    yhy = _dot(y, hy)
    new = (
        h + (rho * rho * yhy + rho) * jnp.outer(s, s) - rho * (jnp.outer(hy, s) + jnp.outer(s, hy))
    )
    return linalg.symmetrize(new)


def should_update(
    s: jax.Array, y: jax.Array, scale: jax.Array, eps: float | jax.Array = 1e-4
) -> jax.Array:
    r"""The skip rule of the authors' code: update only if :math:`s^\top y > 0` and
    :math:`s^\top y > \epsilon\, (s^\top s)\, \|\bar g\|`.

    Args:
      s, y: the (damped) pair.
      scale: :math:`\|\bar g\|`, the norm of the current mean pre-activation gradient (G side)
        or of the mean homogeneous input :math:`\bar a` (A side).
      eps: :math:`\epsilon` (``1e-4`` in the authors' code).

    Returns:
      Boolean scalar: ``True`` when the update is to be applied.
    """
    sy = _dot(s, y)
    ss = _dot(s, s)
    return (sy > 0) & (sy > eps * ss * scale) & jnp.isfinite(sy)


class DampingInfo(NamedTuple):
    """Which damping branches were taken (boolean scalars), for diagnostics and tests."""

    powell_h: jax.Array
    powell_identity: jax.Array


def powell_damping_h(
    s: jax.Array, y: jax.Array, hy: jax.Array, mu1: float | jax.Array = 0.2
) -> tuple[jax.Array, jax.Array]:
    r"""Powell damping applied to ``H`` (step 1 of double damping).

    If :math:`s^\top y \le \mu_1 y^\top q` with :math:`q = H y` (``hy``), returns
    :math:`\theta_1 s + (1 - \theta_1) q` with
    :math:`\theta_1 = (1 - \mu_1) y^\top q / (y^\top q - s^\top y)`, else ``s``.

    Returns:
      ``(s_new, taken)``.
    """
    sy = _dot(s, y)
    yq = _dot(y, hy)
    taken = sy <= mu1 * yq
    theta = _safe_div((1.0 - mu1) * yq, yq - sy, 1.0)
    s_new = jnp.where(taken, theta * s + (1.0 - theta) * hy, s)
    return s_new, taken


def powell_damping_identity(
    s: jax.Array, y: jax.Array, mu2: float | jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""Powell damping with :math:`B = I` (step 2 of the 2020 double damping).

    If :math:`s^\top y \le \mu_2 s^\top s`, returns :math:`\theta_2 y + (1 - \theta_2) s` with
    :math:`\theta_2 = (1 - \mu_2) s^\top s / (s^\top s - s^\top y)`, else ``y``.

    Returns:
      ``(y_new, taken)``.
    """
    sy = _dot(s, y)
    ss = _dot(s, s)
    taken = sy <= mu2 * ss
    theta = _safe_div((1.0 - mu2) * ss, ss - sy, 1.0)
    y_new = jnp.where(taken, theta * y + (1.0 - theta) * s, y)
    return y_new, taken


def double_damping(
    s: jax.Array,
    y: jax.Array,
    hy: jax.Array,
    mu1: float | jax.Array,
    mu2: float | jax.Array,
    form: str = "2020",
) -> tuple[jax.Array, jax.Array, DampingInfo]:
    r"""Double damping of a pair (see the module docstring).

    Args:
      s, y: the undamped pair.
      hy: :math:`H y` with the current ``H`` (dense product or L-BFGS compact form).
      mu1: :math:`\mu_1` of the Powell step on ``H`` (0.2 in the papers).
      mu2: :math:`\mu_2` of the second step (:math:`\sqrt{\lambda}` in the papers).
      form: ``"2020"`` (Powell with :math:`B = I`) or ``"lm"`` (:math:`y \leftarrow y + \mu_2 s`).

    Returns:
      ``(s, y, info)``: the damped pair and the branches taken. The second step sees the ``s``
      produced by the first (as in the authors' code).
    """
    if form not in ("2020", "lm"):
        raise ValueError(f"double damping form must be '2020' or 'lm', got {form!r}.")
    s, taken1 = powell_damping_h(s, y, hy, mu1)
    if form == "2020":
        y, taken2 = powell_damping_identity(s, y, mu2)
    else:
        y = y + mu2 * s
        taken2 = jnp.asarray(True)
    return s, y, DampingInfo(taken1, taken2)


# ---------------------------------------------------------------------------------------------
# L-BFGS memory in compact form.


class LBFGSMemory(NamedTuple):
    """A FIFO of at most ``L`` curvature pairs, oldest first.

    Attributes:
      s: ``(L, d)``; the valid pairs are the last ``count`` rows, the others are zero.
      y: ``(L, d)``, likewise.
      count: number of valid pairs (int32, at most ``L``).
    """

    s: jax.Array
    y: jax.Array
    count: jax.Array


def lbfgs_init(memory_size: int, dim: int, dtype=jnp.float32) -> LBFGSMemory:
    """An empty memory of ``memory_size`` pairs of length ``dim`` (``H = γ I``)."""
    # Two distinct buffers: a state whose leaves share one buffer cannot be donated.
    return LBFGSMemory(
        jnp.zeros((memory_size, dim), dtype),
        jnp.zeros((memory_size, dim), dtype),
        jnp.zeros([], jnp.int32),
    )


def lbfgs_push(mem: LBFGSMemory, s: jax.Array, y: jax.Array, accept: jax.Array) -> LBFGSMemory:
    """Appends ``(s, y)`` (dropping the oldest pair when full) where ``accept`` is True."""
    new_s = jnp.concatenate([mem.s[1:], s[None].astype(mem.s.dtype)], axis=0)
    new_y = jnp.concatenate([mem.y[1:], y[None].astype(mem.y.dtype)], axis=0)
    new_count = jnp.minimum(mem.count + 1, mem.s.shape[0]).astype(jnp.int32)
    return LBFGSMemory(
        jnp.where(accept, new_s, mem.s),
        jnp.where(accept, new_y, mem.y),
        jnp.where(accept, new_count, mem.count),
    )


def lbfgs_apply(mem: LBFGSMemory, v: jax.Array, gamma: float | jax.Array = 1.0) -> jax.Array:
    r"""``H v`` for every row ``v`` of ``v`` (``(..., d)``), by the compact form.

    The empty slots (zero rows) get a unit diagonal in ``R`` and zero in ``D``, so they drop out
    of the product exactly. Cost: :math:`O(n L d + n L^2)` for ``n`` rows.

    Args:
      mem: the memory (``L`` pairs of length ``d``).
      v: ``(d,)`` or ``(n, d)``.
      gamma: :math:`\gamma` of :math:`H_0 = \gamma I` (fixed to 1 in the authors' K-BFGS(L)).

    Returns:
      ``H v`` with the shape of ``v``.
    """
    s_mat, y_mat = mem.s, mem.y
    size = s_mat.shape[0]
    valid = jnp.arange(size) >= size - mem.count
    sty = jnp.matmul(s_mat, y_mat.T, precision=_HIGHEST)  # (L, L): s_i^T y_j
    d = jnp.diagonal(sty)
    r = jnp.triu(sty)
    r = r + jnp.diag(jnp.where(valid, 0.0, 1.0).astype(r.dtype))
    yty = jnp.matmul(y_mat, y_mat.T, precision=_HIGHEST)
    vec = v.ndim == 1
    v2 = v[None] if vec else v.reshape(-1, v.shape[-1])
    sv = jnp.matmul(s_mat, v2.T, precision=_HIGHEST)  # (L, n)
    yv = jnp.matmul(y_mat, v2.T, precision=_HIGHEST)
    p = jax.scipy.linalg.solve_triangular(r, sv, lower=False)  # R^{-1} S^T v
    mid = jnp.matmul(jnp.diag(d) + gamma * yty, p, precision=_HIGHEST)
    w = jax.scipy.linalg.solve_triangular(r, mid - gamma * yv, lower=False, trans="T")
    out = (
        gamma * v2
        + jnp.matmul(w.T, s_mat, precision=_HIGHEST)
        - gamma * jnp.matmul(p.T, y_mat, precision=_HIGHEST)
    )
    return out[0] if vec else out.reshape(v.shape)
