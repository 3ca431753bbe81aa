"""Guarded dense linear algebra shared by the optimizers.

Every curvature-based transform in ``kfqn_jax`` funnels its matrix maths through this module, so
that the numerical guards live in one place:

* symmetric positive-definite (SPD) inverses and solves by a damped Cholesky factorisation;
* a NaN-guarded symmetric eigendecomposition (:func:`safe_eigh`);
* inverse ``p``-th roots by eigendecomposition or by a coupled Newton iteration;
* factored Tikhonov ("pi") damping for Kronecker-factored curvature, computed in log space;
* Kronecker matrix-vector products done as two matmuls, never forming ``A ⊗ G``;
* tree-level finiteness checks for skip-on-NaN updates.

Conventions:

* All functions are pure and ``jax.jit`` compatible; no Python control flow depends on traced
  values.
* Functions taking matrices accept leading batch dimensions ``(..., n, n)``; callers may stack
  equal-size factors and treat them in one call. Damping arguments are scalars or arrays of the
  batch shape ``(...,)``.
* Matmuls use ``precision=jax.lax.Precision.HIGHEST`` so that float32 results are not degraded
  by TF32/bfloat16 passes on accelerators.
* Non-finite input never reaches a LAPACK/cuSOLVER kernel: offending matrices are replaced by the
  identity before factorising, and the corresponding outputs are set to NaN afterwards. Callers
  detect failure with :func:`is_finite` and recover with :func:`where_finite`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "add_to_diagonal",
    "damped_cholesky_inverse",
    "damped_cholesky_solve",
    "inverse_pth_root",
    "is_finite",
    "kron_mvp",
    "pi_adjusted_damping",
    "pi_damping",
    "safe_eigh",
    "symmetrize",
    "where_finite",
]

_HIGHEST = lax.Precision.HIGHEST

# Newton iterations stop (keeping the previous iterate) when the residual grows by this factor,
# which only happens once rounding errors dominate.
_NEWTON_DIVERGENCE_FACTOR = 1.2


def _matmul(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=_HIGHEST)


def _check_square(mat: jax.Array, name: str = "mat") -> int:
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"`{name}` must have shape (..., n, n); got {mat.shape}.")
    return mat.shape[-1]


def _as_float_array(x: jax.typing.ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _batch_scalar(value: jax.typing.ArrayLike, dtype: Any) -> jax.Array:
    """Casts a scalar or ``(...,)`` per-batch value to ``dtype`` with shape ``(..., 1, 1)``."""
    value = jnp.asarray(value, dtype=dtype)
    return value[..., None, None]


def _eye_like(mat: jax.Array) -> jax.Array:
    return jnp.eye(mat.shape[-1], dtype=mat.dtype)


def _finite_per_matrix(mat: jax.Array) -> jax.Array:
    """Boolean of shape ``(...,)``: whether each matrix in the batch is entirely finite."""
    return jnp.all(jnp.isfinite(mat), axis=(-2, -1))


def _sanitize(mat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Replaces non-finite matrices in a batch by the identity.

    Returns:
        ``(finite, safe_mat)`` where ``finite`` has shape ``(...,)`` and ``safe_mat`` equals
        ``mat`` wherever ``finite`` holds and the identity elsewhere.
    """
    finite = _finite_per_matrix(mat)
    safe = jnp.where(finite[..., None, None], mat, _eye_like(mat))
    return finite, safe


def _nan_where_not(finite: jax.Array, x: jax.Array) -> jax.Array:
    """Sets the matrices of ``x`` (``(..., a, b)``) to NaN where ``finite`` (``(...,)``) fails."""
    return jnp.where(finite[..., None, None], x, jnp.asarray(jnp.nan, dtype=x.dtype))


# ------------------------------------------------------------------------------------------------
# Elementary helpers.
# ------------------------------------------------------------------------------------------------


def symmetrize(x: jax.typing.ArrayLike) -> jax.Array:
    r"""Symmetric part of a (batch of) square matrices.

    .. math::
        \operatorname{sym}(X) = \tfrac12 (X + X^\top),

    with the transpose taken over the last two axes.

    Args:
        x: Array of shape ``(..., n, n)``.

    Returns:
        Array of the same shape and dtype as ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> symmetrize(jnp.array([[1.0, 2.0], [0.0, 1.0]]))
        Array([[1., 1.],
               [1., 1.]], dtype=float32)
    """
    x = jnp.asarray(x)
    _check_square(x, "x")
    return (x + jnp.swapaxes(x, -1, -2)) / 2


def add_to_diagonal(x: jax.typing.ArrayLike, value: jax.typing.ArrayLike) -> jax.Array:
    r"""Adds a multiple of the identity to (a batch of) square matrices.

    .. math::
        X + v I,

    where :math:`v` is ``value``.

    Args:
        x: Array of shape ``(..., n, n)``.
        value: Scalar, or array of shape ``(...,)`` broadcastable to the batch dimensions of
            ``x`` (one value per matrix). It is cast to ``x.dtype``.

    Returns:
        Array of shape ``(..., n, n)`` (batch dimensions broadcast with those of ``value``) and
        dtype ``x.dtype``.

    Example:
        >>> import jax.numpy as jnp
        >>> add_to_diagonal(jnp.zeros((2, 2)), 3.0)
        Array([[3., 0.],
               [0., 3.]], dtype=float32)
    """
    x = jnp.asarray(x)
    _check_square(x, "x")
    return x + _batch_scalar(value, x.dtype) * _eye_like(x)


# ------------------------------------------------------------------------------------------------
# Damped Cholesky inverse and solve.
# ------------------------------------------------------------------------------------------------


def _damped_cholesky(mat: jax.Array, damping: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of ``sym(mat) + damping I`` with a per-matrix finiteness flag."""
    damped = add_to_diagonal(symmetrize(mat), damping)
    finite, safe = _sanitize(damped)
    chol = lax.linalg.cholesky(safe, symmetrize_input=False)
    return finite, chol


def damped_cholesky_inverse(mat: jax.typing.ArrayLike, damping: jax.typing.ArrayLike) -> jax.Array:
    r"""Inverse of a damped symmetric positive-definite matrix via Cholesky.

    .. math::
        (\operatorname{sym}(M) + \lambda I)^{-1} = L^{-\top} L^{-1},
        \qquad L L^\top = \operatorname{sym}(M) + \lambda I,

    with :math:`M` = ``mat`` and :math:`\lambda` = ``damping``. :math:`L^{-1}` is obtained by
    one triangular solve against the identity and the product :math:`L^{-\top} L^{-1}` is
    formed as a Gram product (:func:`gram`, only the upper panels for one large matrix), so
    the result is exactly symmetric.

    Args:
        mat: Array of shape ``(..., n, n)``, approximately symmetric positive semi-definite.
        damping: Scalar or array of shape ``(...,)`` (one damping per matrix).

    Returns:
        Symmetric array of shape ``(..., n, n)`` and the dtype of ``mat``.

    Note:
        Failure is reported in-band, never by an exception and never by a hang. If a matrix in
        the batch contains NaN/Inf (or ``damping`` is non-finite), that matrix is replaced by the
        identity before the factorisation and its output is set entirely to NaN; other matrices
        in the batch are unaffected. If the damped matrix is finite but not positive definite
        (e.g. indefinite with too little damping), XLA's Cholesky fills the factor with NaN, so
        the output is again NaN. Test the result with :func:`is_finite` and fall back with
        :func:`where_finite`.

    Example:
        >>> import jax.numpy as jnp
        >>> damped_cholesky_inverse(jnp.zeros((2, 2)), 4.0)
        Array([[0.25, 0.  ],
               [0.  , 0.25]], dtype=float32)
    """
    mat = _as_float_array(mat)
    _check_square(mat)
    finite, chol = _damped_cholesky(mat, damping)
    eye = jnp.broadcast_to(_eye_like(chol), chol.shape)
    chol_inv = lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)
    inv = (
        gram(chol_inv)
        if chol_inv.ndim == 2
        else symmetrize(_matmul(jnp.swapaxes(chol_inv, -1, -2), chol_inv))
    )
    return _nan_where_not(finite, inv)


def damped_cholesky_solve(
    mat: jax.typing.ArrayLike,
    rhs: jax.typing.ArrayLike,
    damping: jax.typing.ArrayLike,
) -> jax.Array:
    r"""Solves a damped symmetric positive-definite linear system via Cholesky.

    .. math::
        (\operatorname{sym}(M) + \lambda I)\, X = B,

    with :math:`M` = ``mat``, :math:`B` = ``rhs`` and :math:`\lambda` = ``damping``, by
    factorising :math:`LL^\top = \operatorname{sym}(M) + \lambda I` and doing a forward and a
    backward triangular solve.

    The layout of ``rhs`` is decided by its rank relative to ``mat``:

    * ``rhs.ndim == mat.ndim``: matrix right-hand side of shape ``(..., n, k)``;
    * ``rhs.ndim == mat.ndim - 1``: vector right-hand side of shape ``(..., n)``.

    So for an unbatched ``mat`` of shape ``(n, n)``, ``rhs`` of shape ``(n,)`` is a vector and
    ``(n, k)`` is ``k`` right-hand-side columns. Batch dimensions of ``mat`` and ``rhs`` are
    broadcast against each other.

    Args:
        mat: Array of shape ``(..., n, n)``, approximately symmetric positive semi-definite.
        rhs: Array of shape ``(..., n)`` or ``(..., n, k)`` (see above).
        damping: Scalar or array of shape ``(...,)`` (one damping per matrix).

    Returns:
        The solution :math:`X`, with the shape of ``rhs`` (batch dimensions broadcast).

    Note:
        As for :func:`damped_cholesky_inverse`, a non-finite matrix or a failed factorisation
        gives NaN in the corresponding solution instead of raising or hanging.

    Example:
        >>> import jax.numpy as jnp
        >>> damped_cholesky_solve(jnp.eye(2), jnp.array([4.0, 8.0]), 3.0)
        Array([1., 2.], dtype=float32)
    """
    mat = _as_float_array(mat)
    rhs = jnp.asarray(rhs)
    n = _check_square(mat)
    if rhs.ndim == mat.ndim:
        is_vector = False
    elif rhs.ndim == mat.ndim - 1:
        is_vector = True
    else:
        raise ValueError(
            "`rhs` must have rank mat.ndim (matrix rhs (..., n, k)) or mat.ndim - 1 (vector rhs "
            f"(..., n)); got mat.shape={mat.shape}, rhs.shape={rhs.shape}."
        )
    rhs_mat = rhs[..., None] if is_vector else rhs
    if rhs_mat.shape[-2] != n:
        raise ValueError(f"`rhs` has {rhs_mat.shape[-2]} rows but `mat` is {n}x{n}.")
    rhs_mat = rhs_mat.astype(mat.dtype)

    finite, chol = _damped_cholesky(mat, damping)
    batch = jnp.broadcast_shapes(chol.shape[:-2], rhs_mat.shape[:-2])
    chol = jnp.broadcast_to(chol, batch + chol.shape[-2:])
    finite = jnp.broadcast_to(finite, batch)
    rhs_mat = jnp.broadcast_to(rhs_mat, batch + rhs_mat.shape[-2:])
    # L y = b, then L^T x = y.
    y = lax.linalg.triangular_solve(chol, rhs_mat, left_side=True, lower=True)
    x = lax.linalg.triangular_solve(chol, y, left_side=True, lower=True, transpose_a=True)
    x = _nan_where_not(finite, x)
    return x[..., 0] if is_vector else x


# ------------------------------------------------------------------------------------------------
# Eigendecomposition and inverse roots.
# ------------------------------------------------------------------------------------------------


def safe_eigh(
    mat: jax.typing.ArrayLike, clip_min: float | None = 0.0
) -> tuple[jax.Array, jax.Array]:
    r"""NaN-guarded eigendecomposition of (a batch of) symmetric matrices.

    .. math::
        \operatorname{sym}(M) = Q \operatorname{diag}(w) Q^\top,
        \qquad w \leftarrow \max(w, w_{\min}),

    with :math:`M` = ``mat`` and :math:`w_{\min}` = ``clip_min``.

    The eigensolver never sees non-finite input: each non-finite matrix of the batch is replaced
    by the identity (a cheap elementwise ``where``) before ``eigh``, and its outputs are then set
    to NaN eigenvalues and identity eigenvectors; finite matrices of the same batch get their true
    decomposition. This is deliberately not a ``lax.cond`` on a global finiteness flag: that
    would poison every matrix of a batch because of one bad one, and under ``vmap`` a ``cond``
    lowers to a ``select`` that runs both branches, i.e. ``eigh`` on the NaN input, whose
    behaviour in cuSOLVER/LAPACK is unspecified.

    Args:
        mat: Array of shape ``(..., n, n)``. Only its symmetric part is used.
        clip_min: Lower bound applied to the eigenvalues (``0.0`` projects onto the PSD cone);
            ``None`` disables clipping. NaN eigenvalues stay NaN.

    Returns:
        ``(eigenvalues, eigenvectors)`` of shapes ``(..., n)`` (ascending) and ``(..., n, n)``
        (columns are eigenvectors), in the dtype of ``mat``.

    Example:
        >>> import jax.numpy as jnp
        >>> w, q = safe_eigh(jnp.array([[2.0, 0.0], [0.0, -1.0]]))
        >>> w
        Array([0., 2.], dtype=float32)
    """
    mat = _as_float_array(mat)
    _check_square(mat)
    finite, safe = _sanitize(symmetrize(mat))
    w, q = jnp.linalg.eigh(safe, symmetrize_input=False)
    # Non-finite matrices were replaced by I, whose eigenvectors are already I.
    w = jnp.where(finite[..., None], w, jnp.asarray(jnp.nan, dtype=w.dtype))
    if clip_min is not None:
        w = jnp.maximum(w, jnp.asarray(clip_min, dtype=w.dtype))
    return w, q


def _matrix_power(x: jax.Array, p: int) -> jax.Array:
    """``x**p`` for a static integer ``p >= 1`` by repeated squaring (``O(log p)`` matmuls)."""
    if p == 1:
        return x
    half = _matrix_power(x, p // 2)
    square = _matmul(half, half)
    return _matmul(square, x) if p % 2 else square


def _inverse_pth_root_eigh(mat: jax.Array, p: int) -> jax.Array:
    w, q = safe_eigh(mat, clip_min=None)
    eps = jnp.finfo(w.dtype).eps
    # A zero (or negative semi-definite) matrix has floor <= 0, so its root is inf/NaN: flagged.
    floor = jnp.max(w, axis=-1, keepdims=True) * eps
    w = jnp.maximum(w, floor)
    scaled = q * jnp.power(w, -1.0 / p)[..., None, :]
    return symmetrize(_matmul(scaled, jnp.swapaxes(q, -1, -2)))


def _inverse_pth_root_newton(mat: jax.Array, p: int, num_iters: int, tol: float) -> jax.Array:
    dtype = mat.dtype
    finite, mat = _sanitize(mat)
    eye = _eye_like(mat)
    batch = mat.shape[:-2]

    norm = jnp.sqrt(jnp.sum(jnp.square(mat), axis=(-2, -1)))
    # The zero matrix has no inverse root: report it as a failure (NaN) like the eigh path.
    finite = finite & (norm > 0)
    norm = jnp.where(finite, norm, jnp.ones((), dtype))
    z = (p + 1) / (2 * norm)
    x0 = jnp.broadcast_to(jnp.power(z, 1.0 / p)[..., None, None] * eye, mat.shape)
    m0 = z[..., None, None] * mat

    def residual(m: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.sum(jnp.square(m - eye), axis=(-2, -1)))

    err0 = residual(m0)
    done0 = ~finite | (err0 <= tol)
    tol_arr = jnp.asarray(tol, dtype=dtype)

    def cond_fn(state: tuple[jax.Array, ...]) -> jax.Array:
        i, _, _, _, done = state
        return (i < num_iters) & ~jnp.all(done)

    def body_fn(state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        i, x, m, err, done = state
        t = ((p + 1) * eye - m) / p
        x_new = _matmul(x, t)
        m_new = _matmul(_matrix_power(t, p), m)
        err_new = residual(m_new)
        diverged = err_new > _NEWTON_DIVERGENCE_FACTOR * err
        accept = ~done & ~diverged
        keep = accept[..., None, None]
        x = jnp.where(keep, x_new, x)
        m = jnp.where(keep, m_new, m)
        err = jnp.where(accept, err_new, err)
        done = done | diverged | (err_new <= tol_arr)
        return i + 1, x, m, err, done

    init = (jnp.zeros((), jnp.int32), x0, m0, err0, jnp.broadcast_to(done0, batch))
    _, x, _, _, _ = lax.while_loop(cond_fn, body_fn, init)
    return _nan_where_not(finite, symmetrize(x))


def inverse_pth_root(
    mat: jax.typing.ArrayLike,
    p: int,
    damping: jax.typing.ArrayLike = 0.0,
    *,
    method: str = "eigh",
    num_iters: int = 100,
    tol: float = 1e-6,
) -> jax.Array:
    r"""Inverse ``p``-th root of a damped symmetric positive semi-definite matrix.

    .. math::
        (\operatorname{sym}(M) + \lambda I)^{-1/p},

    with :math:`M` = ``mat``, :math:`\lambda` = ``damping`` and integer :math:`p \ge 1`.

    ``method="eigh"``: with :math:`A = \operatorname{sym}(M) + \lambda I = Q\operatorname{diag}(w)
    Q^\top` from :func:`safe_eigh`, returns :math:`Q \operatorname{diag}(\tilde w^{-1/p})
    Q^\top`, where :math:`\tilde w_i = \max(w_i, \epsilon \max_j w_j)` floors the eigenvalues
    at machine epsilon relative to the largest one (guarding round-off negatives of a singular
    PSD matrix, whose root is then large but finite).

    ``method="newton"``: the coupled Newton iteration for the inverse ``p``-th root (Guo &
    Higham, 2006). With :math:`z = (p + 1) / (2 \lVert A \rVert_F)`,

    .. math::
        X_0 = z^{1/p} I, \qquad M_0 = z A, \\
        T_k = \tfrac{1}{p}\bigl((p + 1) I - M_k\bigr), \qquad
        X_{k+1} = X_k T_k, \qquad M_{k+1} = T_k^p M_k .

    The invariant :math:`M_k = X_k^p A` holds throughout and :math:`M_k \to I`, hence
    :math:`X_k \to A^{-1/p}`. Scaling by the Frobenius norm (an upper bound of the spectral norm)
    puts the spectrum of :math:`M_0` in :math:`(0, (p+1)/2]`, inside the convergence region
    :math:`(0, p + 1)`. The loop is a ``lax.while_loop`` that stops after ``num_iters``
    iterations, when the relative residual :math:`\lVert M_k - I \rVert_F \le` ``tol`` (this
    bounds :math:`\lVert X_k^p A - I \rVert_2`), or when the residual grows by more than 1.2x
    (round-off has taken over; the previous iterate is kept). Each matrix of a batch stops
    independently. Small eigenvalues converge linearly at first (a factor
    :math:`((p+1)/p)^p \ge 2` per step), so roughly :math:`\log_2 \kappa(A)` iterations are
    needed before quadratic convergence sets in; keep :math:`\lambda > 0`.

    Args:
        mat: Array of shape ``(..., n, n)``, approximately symmetric positive semi-definite.
        p: Static integer root order, ``p >= 1`` (``p = 1`` gives the inverse).
        damping: Scalar or array of shape ``(...,)`` (one damping per matrix).
        method: ``"eigh"`` or ``"newton"`` (static).
        num_iters: Maximum number of Newton iterations (static; ``"newton"`` only).
        tol: Stopping tolerance on :math:`\lVert M_k - I \rVert_F` (``"newton"`` only). In
            float32 round-off usually stops the iteration (via the growth test) above ``1e-6``.

    Returns:
        Symmetric array of shape ``(..., n, n)``. Matrices whose input is non-finite, and the
        damped matrix :math:`A = 0` (e.g. a zero factor with ``damping=0``), give non-finite
        output (NaN or inf), detectable with :func:`is_finite`. Both methods assume :math:`A`
        is positive semi-definite; a singular :math:`A` gives a huge but finite root, so use
        ``damping > 0``.

    Raises:
        ValueError: If ``p`` is not a positive integer, ``method`` is unknown or ``num_iters``
            is negative.

    Example:
        >>> import jax.numpy as jnp
        >>> inverse_pth_root(jnp.diag(jnp.array([4.0, 16.0])), 2)
        Array([[0.5 , 0.  ],
               [0.  , 0.25]], dtype=float32)

    References:
        Guo & Higham, "A Schur-Newton method for the matrix p-th root and its inverse", SIAM J.
        Matrix Anal. Appl. 28(3), 2006. Gupta, Koren & Singer, "Shampoo: Preconditioned
        stochastic tensor optimization", ICML 2018.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"`p` must be a positive Python int; got {p!r}.")
    if method not in ("eigh", "newton"):
        raise ValueError(f"`method` must be 'eigh' or 'newton'; got {method!r}.")
    if num_iters < 0:
        raise ValueError(f"`num_iters` must be >= 0; got {num_iters}.")
    mat = _as_float_array(mat)
    _check_square(mat)
    damped = add_to_diagonal(symmetrize(mat), damping)
    if method == "eigh":
        return _inverse_pth_root_eigh(damped, p)
    return _inverse_pth_root_newton(damped, p, num_iters, tol)


# ------------------------------------------------------------------------------------------------
# Tree-level finiteness.
# ------------------------------------------------------------------------------------------------


def is_finite(tree: Any) -> jax.Array:
    """Whether every element of every leaf of ``tree`` is finite.

    Args:
        tree: A pytree of arrays (integer and boolean leaves count as finite).

    Returns:
        Boolean scalar array; ``True`` for an empty tree.

    Example:
        >>> import jax.numpy as jnp
        >>> is_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])})
        Array(False, dtype=bool)
    """
    leaves = jax.tree.leaves(tree)
    flags = [jnp.all(jnp.isfinite(jnp.asarray(leaf))) for leaf in leaves]
    return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def where_finite(new: Any, old: Any) -> Any:
    """Selects ``new`` if all of it is finite, else ``old`` (skip-on-NaN).

    One global flag :func:`is_finite` ``(new)`` decides for the whole tree, so a single NaN leaf
    rejects the entire update and the state stays consistent.

    Args:
        new: Candidate pytree.
        old: Fallback pytree with the same structure, shapes and dtypes.

    Returns:
        A pytree with the structure of ``new``.

    Example:
        >>> import jax.numpy as jnp
        >>> where_finite(jnp.array([1.0, jnp.inf]), jnp.array([0.0, 0.0]))
        Array([0., 0.], dtype=float32)
    """
    flag = is_finite(new)
    return jax.tree.map(lambda n, o: jnp.where(flag, n, o), new, old)


# ------------------------------------------------------------------------------------------------
# Factored Tikhonov damping.
# ------------------------------------------------------------------------------------------------


def _mean_eigenvalue(factor: jax.typing.ArrayLike) -> jax.Array:
    factor = _as_float_array(factor)
    n = _check_square(factor, "factor")
    return jnp.trace(factor, axis1=-2, axis2=-1) / n


def pi_damping(
    a_factor: jax.typing.ArrayLike,
    g_factor: jax.typing.ArrayLike,
    damping: jax.typing.ArrayLike,
    *,
    eps: float = 1e-12,
) -> tuple[jax.Array, jax.Array]:
    r"""Factored Tikhonov damping for a two-factor Kronecker approximation (KFAC).

    Approximates :math:`A \otimes G + \lambda I` by
    :math:`(A + \pi\sqrt{\lambda} I) \otimes (G + \sqrt{\lambda}/\pi\, I)` with

    .. math::
        \pi = \sqrt{\frac{\operatorname{tr}(A) / d_A}{\operatorname{tr}(G) / d_G}},

    where :math:`A` = ``a_factor`` (:math:`d_A \times d_A`), :math:`G` = ``g_factor``
    (:math:`d_G \times d_G`) and :math:`\lambda` = ``damping``. The choice of :math:`\pi`
    minimises the norm of the cross terms (Martens & Grosse 2015, §6.3). If either average
    eigenvalue is ``<= eps`` (e.g. an all-zero factor), :math:`\pi = 1`. NaN traces propagate.

    Args:
        a_factor: Array of shape ``(..., d_A, d_A)``.
        g_factor: Array of shape ``(..., d_G, d_G)``.
        damping: Total damping :math:`\lambda \ge 0`, scalar or shape ``(...,)``.
        eps: Threshold below which an average eigenvalue counts as zero.

    Returns:
        ``(damping_a, damping_g)`` = :math:`(\pi\sqrt\lambda, \sqrt\lambda/\pi)`, each of the
        broadcast batch shape ``(...)``.

    Example:
        >>> import jax.numpy as jnp
        >>> pi_damping(4.0 * jnp.eye(3), jnp.eye(2), 0.01)
        (Array(0.2, dtype=float32), Array(0.05, dtype=float32))

    References:
        Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
        curvature", ICML 2015.
    """
    t_a = _mean_eigenvalue(a_factor)
    t_g = _mean_eigenvalue(g_factor)
    dtype = jnp.result_type(t_a, t_g)
    t_a, t_g = t_a.astype(dtype), t_g.astype(dtype)
    # Written so that NaN traces give ok=True and propagate, while (near-)zero traces give pi=1.
    ok = ~((t_a <= eps) | (t_g <= eps))
    one = jnp.ones((), dtype)
    pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, t_a, one) / jnp.where(ok, t_g, one)), one)
    sqrt_damping = jnp.sqrt(jnp.asarray(damping, dtype=dtype))
    return pi * sqrt_damping, sqrt_damping / pi


def pi_adjusted_damping(
    factors: Sequence[jax.typing.ArrayLike],
    damping: jax.typing.ArrayLike,
    *,
    eps: float = 1e-12,
) -> list[jax.Array]:
    r"""Factored Tikhonov damping for a Kronecker product of ``k`` factors.

    Generalises :func:`pi_damping` to :math:`F_1 \otimes \dots \otimes F_k + \lambda I \approx
    \bigotimes_i (F_i + \lambda_i I)`. With average eigenvalues
    :math:`t_i = \operatorname{tr}(F_i)/d_i` and their geometric mean
    :math:`c = \exp\bigl(\tfrac1k \sum_i \log t_i\bigr)` (computed in log space to avoid
    overflow of the product),

    .. math::
        \lambda_i = \lambda^{1/k}\, \frac{t_i}{c}, \qquad \prod_i \lambda_i = \lambda .

    Equivalently each factor is normalised to average eigenvalue 1, damped by
    :math:`\lambda^{1/k}`, and rescaled. For ``k = 2`` this equals :func:`pi_damping`. If any
    :math:`t_i \le` ``eps``, every factor gets :math:`\lambda^{1/k}`. NaN traces propagate.

    Args:
        factors: Sequence of ``k >= 1`` arrays of shapes ``(..., d_i, d_i)``.
        damping: Total damping :math:`\lambda \ge 0`, scalar or shape ``(...,)``.
        eps: Threshold below which an average eigenvalue counts as zero.

    Returns:
        List of ``k`` arrays :math:`\lambda_i`, each of the broadcast batch shape ``(...)``.

    Raises:
        ValueError: If ``factors`` is empty.

    Example:
        >>> import jax.numpy as jnp
        >>> pi_adjusted_damping([4.0 * jnp.eye(3), jnp.eye(2)], 0.01)
        [Array(0.2, dtype=float32), Array(0.05, dtype=float32)]

    References:
        Martens & Grosse, ICML 2015 (§6.3); Ren & Goldfarb, "Tensor normal training for deep
        learning models", NeurIPS 2021.
    """
    if len(factors) == 0:
        raise ValueError("`factors` must contain at least one matrix.")
    k = len(factors)
    traces = [_mean_eigenvalue(f) for f in factors]
    dtype = jnp.result_type(*traces)
    traces = [t.astype(dtype) for t in traces]
    ok = ~functools.reduce(jnp.logical_or, [t <= eps for t in traces])
    one = jnp.ones((), dtype)
    logs = [jnp.log(jnp.where(ok, t, one)) for t in traces]
    log_c = sum(logs) / k
    root = jnp.power(jnp.asarray(damping, dtype=dtype), 1.0 / k)
    return [root * jnp.where(ok, jnp.exp(log_t - log_c), one) for log_t in logs]


# ------------------------------------------------------------------------------------------------
# Kronecker products.
# ------------------------------------------------------------------------------------------------


def kron_mvp(
    a: jax.typing.ArrayLike, g: jax.typing.ArrayLike, m: jax.typing.ArrayLike
) -> jax.Array:
    r"""Kronecker-factored matrix-vector product in the Flax kernel layout.

    Returns :math:`A M G` with :math:`A` = ``a`` (``d_in x d_in``), :math:`M` = ``m``
    (``d_in x d_out``, the layout of a Flax ``Dense`` kernel) and :math:`G` = ``g``
    (``d_out x d_out``), using two matmuls instead of forming the Kronecker product. With the
    row-major vectorisation :math:`\operatorname{vec}(M)_{i d_{out} + j} = M_{ij}` (NumPy's
    ``m.reshape(-1)``),

    .. math::
        \operatorname{vec}(A M G) = (A \otimes G^\top) \operatorname{vec}(M),

    so for symmetric :math:`G` (curvature factors, their inverses and roots) this is
    :math:`(A \otimes G)\operatorname{vec}(M)`, i.e.
    ``(np.kron(a, g) @ m.reshape(-1)).reshape(m.shape)``.

    Args:
        a: Array of shape ``(..., d_in, d_in)``.
        g: Array of shape ``(..., d_out, d_out)``.
        m: Array of shape ``(..., d_in, d_out)``. Batch dimensions of all three broadcast.

    Returns:
        Array of shape ``(..., d_in, d_out)``.

    Example:
        >>> import jax.numpy as jnp
        >>> kron_mvp(2.0 * jnp.eye(2), 3.0 * jnp.eye(3), jnp.ones((2, 3)))
        Array([[6., 6., 6.],
               [6., 6., 6.]], dtype=float32)
    """
    a, g, m = jnp.asarray(a), jnp.asarray(g), jnp.asarray(m)
    _check_square(a, "a")
    _check_square(g, "g")
    if m.ndim < 2 or m.shape[-2] != a.shape[-1] or m.shape[-1] != g.shape[-1]:
        raise ValueError(
            f"`m` must have shape (..., {a.shape[-1]}, {g.shape[-1]}) to match `a` {a.shape} and "
            f"`g` {g.shape}; got {m.shape}."
        )
    return _matmul(_matmul(a, m), g)


def gram(
    x: jax.typing.ArrayLike,
    *,
    block: int = 192,
    with_diagonal: bool = False,
    append_one: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""``x^T x`` for ``x`` of shape ``(n, d)``, exploiting symmetry for large ``d``.

    .. math:: G = X^T X, \qquad G_{ij} = \sum_k X_{ki} X_{kj}

    For ``d >= 2 * block`` the columns are split into ``k = d // block`` panels (each at least
    ``block`` wide) and only the panel pairs ``i <= j`` are multiplied (the others are their
    transposes): about ``(k + 1) / (2k)`` of the multiply-adds of the plain product. The result
    is exactly symmetric. The default width suits CPU GEMM kernels: for ``n = 1000`` rows,
    4-5 panels for ``d`` near 1000 and 2 for ``d`` near 500 took the least CPU time (JAX 0.10
    on a 2-core x86 machine; see ``benchmarks/RESULTS.md``).

    Args:
      x: a 2-D array.
      block: minimum panel width; below ``2 * block`` columns the plain product is used.
      with_diagonal: also return ``diag(G)``, read from the products themselves. A caller that
        checks the diagonal (e.g. for finiteness) and then consumes ``G`` in one elementwise
        operation lets XLA fuse the assembly of the panels into that operation instead of
        writing ``G`` out and reading it back.
      append_one: the Gram matrix of ``[x, 1]`` (a column of ones appended, the homogeneous
        coordinate of a layer with a bias), ``(d + 1, d + 1)``, without forming ``[x, 1]``:
        the extra row and column are the column sums of ``x`` and ``n``.

    Returns:
      The ``(d, d)`` Gram matrix, or ``(G, diag(G))`` with ``with_diagonal``.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"gram expects a 2-D array, got shape {x.shape}.")
    n, d = x.shape
    k = d // block if d >= 2 * block else 1
    cuts = [d * i // k for i in range(k + 1)]
    panels = [x[:, cuts[i] : cuts[i + 1]] for i in range(k)] if k > 1 else [x]
    # One level of row blocks (their final concatenation fuses into the caller's use).
    rows = [[None] * (k + append_one) for _ in range(k + append_one)]
    diags = []
    for i in range(k):
        g_ii = _matmul(panels[i].T, panels[i])
        diags.append(jnp.diagonal(g_ii))
        rows[i][i] = symmetrize(g_ii)
        for j in range(i + 1, k):
            blk = _matmul(panels[i].T, panels[j])
            rows[i][j] = blk
            rows[j][i] = blk.T
    if append_one:
        for i in range(k):
            col = jnp.sum(panels[i], axis=0)
            rows[i][k] = col[:, None]
            rows[k][i] = col[None, :]
        corner = jnp.full((1, 1), n, x.dtype)
        rows[k][k] = corner
        diags.append(corner[0])
    g = rows[0][0] if len(rows) == 1 else jnp.block(rows)
    if not with_diagonal:
        return g
    return g, (diags[0] if len(diags) == 1 else jnp.concatenate(diags))
