"""Which curvature block preconditions each parameter, and which parameters fall back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from kfqn_jax._src import layers as layers_lib
from kfqn_jax._src.base import LayerMeta, LayerStats, tree_paths

# Layer kinds each method preconditions with a curvature block; None: every parameter.
METHOD_KINDS: dict[str, tuple[str, ...] | None] = {
    "kfac": ("dense", "conv"),
    "kbfgs": ("dense", "conv"),
    "kbfgs_l": ("dense", "conv"),
    "smw_ng": ("dense", "conv"),
    "smw_gn": ("dense", "conv"),
    "tnt": None,
    "shampoo": None,
    "hessian_free": None,
    "block_hessian_free": None,
}

_BLOCK_NAMES = {
    "kfac": "Kronecker A⊗G",
    "kbfgs": "Kronecker H_a⊗H_g (BFGS)",
    "kbfgs_l": "Kronecker H_a⊗H_g (L-BFGS)",
    "smw_ng": "SMW Fisher (shared Gram)",
    "smw_gn": "SMW Gauss-Newton (shared Gram)",
    "tnt": "tensor-normal modes",
    "shampoo": "Shampoo modes",
    "hessian_free": "full GGN (CG)",
    "block_hessian_free": "GGN block (CG)",
}


@dataclasses.dataclass(frozen=True)
class CoverageRow:
    path: str
    shape: tuple[int, ...]
    block: str | None  # the curvature block's name, or None when the parameter falls back
    detail: str


@dataclasses.dataclass(frozen=True)
class CoverageReport:
    """Per parameter: the block that preconditions it, or the fallback transform."""

    method: str
    rows: tuple[CoverageRow, ...]
    fallback: str

    @property
    def covered(self) -> tuple[CoverageRow, ...]:
        return tuple(r for r in self.rows if r.block is not None)

    @property
    def fallen_back(self) -> tuple[CoverageRow, ...]:
        return tuple(r for r in self.rows if r.block is None)

    def __str__(self) -> str:
        n_cov = sum(int(np.prod(r.shape)) for r in self.covered)
        n_all = sum(int(np.prod(r.shape)) for r in self.rows) or 1
        width = max([len(r.path) for r in self.rows] + [9])
        lines = [
            f"{self.method}: {len(self.covered)}/{len(self.rows)} parameters preconditioned "
            f"({100.0 * n_cov / n_all:.1f}% of the entries); the rest use {self.fallback}.",
            f"{'parameter':<{width}}  {'shape':<16} block",
        ]
        for r in self.rows:
            where = f"{r.block}: {r.detail}" if r.block else f"fallback ({r.detail})"
            lines.append(f"{r.path:<{width}}  {str(r.shape):<16} {where}")
        return "\n".join(lines)


# What each method does by default with parameters outside its blocks (its ``fallback=None``).
_DEFAULT_FALLBACKS = {
    "kfac": "momentum SGD (optax.trace)",
    "kbfgs": "the EMA of the gradient (optax.ema, as the K-BFGS code's momentum)",
    "kbfgs_l": "the EMA of the gradient (optax.ema, as the K-BFGS code's momentum)",
    "smw_ng": "the gradient over the damping (zero curvature outside the blocks)",
    "smw_gn": "the gradient over the damping (zero curvature outside the blocks)",
}


def coverage_report(
    params: Any,
    method: str = "kfac",
    layers: Sequence[LayerMeta] | Mapping[str, LayerStats] | None = None,
    fallback: str | None = None,
) -> CoverageReport:
    """Lists, per parameter path, which curvature block preconditions it.

    Args:
      params: the parameter tree given to the optimizer's ``init``.
      method: a method name (``"kfac"``, ``"kbfgs"``, ``"tnt"``, ...).
      layers: what the method was given as ``layers=`` (metas from
        :func:`kfqn_jax.flax.layer_metas`, or a captured stats dict); ``None`` uses the same
        guess from parameter names as the methods.
      fallback: a description of the fallback transform, for the printout. Default: what the
        method does with ``fallback=None``: momentum SGD (``optax.trace``) for KFAC, as the
        papers treat BatchNorm parameters; the gradient EMA for K-BFGS; ``g / λ`` for SMW.

    Returns:
      A :class:`CoverageReport`; ``print`` it for a table.
    """
    if method not in METHOD_KINDS:
        raise ValueError(f"Unknown method {method!r}; known: {sorted(METHOD_KINDS)}.")
    kinds = METHOD_KINDS[method]
    paths = tree_paths(params)
    shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(params)]
    owner: dict[tuple, str] = {}
    if kinds is not None:
        for m in layers_lib.resolve_layers(params, layers, kinds):
            din = m.in_features + int(m.has_bias)
            owner[tuple(m.kernel_path)] = (
                f"layer {m.name} ({m.kind}, A {din}², G {m.out_features}²)"
            )
            if m.bias_path is not None:
                owner[tuple(m.bias_path)] = f"layer {m.name} (bias, homogeneous coordinate)"
    rows = []
    for p, shape in zip(paths, shapes, strict=True):
        name = "/".join(str(x) for x in p)
        key = p[1:] if p and p[0] == "params" and tuple(p) not in owner else p
        if kinds is None:
            rows.append(CoverageRow(name, shape, _BLOCK_NAMES[method], "own block"))
        elif tuple(key) in owner or tuple(p) in owner:
            rows.append(
                CoverageRow(
                    name, shape, _BLOCK_NAMES[method], owner.get(tuple(p), owner.get(tuple(key)))
                )
            )
        else:
            why = "no Dense/Conv kernel" if p and p[-1] != "kernel" else "layer not captured"
            rows.append(CoverageRow(name, shape, None, why))
    default_fb = _DEFAULT_FALLBACKS.get(method, "the method's own update")
    return CoverageReport(method, tuple(rows), fallback or default_fb)
