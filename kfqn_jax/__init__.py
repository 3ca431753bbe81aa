"""kfqn_jax: practical second-order optimizers for JAX, as optax transformations.

Each method is an ``optax.GradientTransformationExtraArgs`` (``kfac``, ``kbfgs``, ``tnt``, ...,
with a ``scale_by_*`` form without learning rate); per-layer statistics come from the Flax
capture in :mod:`kfqn_jax.flax`. Every transform declares the extra arguments it needs in
``update`` (:func:`requirements`), which the train steps of :mod:`kfqn_jax.flax` read.

A map of the implementation (``kfqn_jax/_src``), lowest layer first:

* ``base``, ``extra_args``: shared types (``LayerMeta``, ``LayerStats``), argument checks, and
  the extra-args protocol with the declared :class:`Requirements`.
* ``linalg``, ``bfgs``, ``woodbury``, ``cg``, ``tensor_modes``, ``lm_damping``: the linear
  algebra and the shared numerical pieces (damped inverses and roots, BFGS/L-BFGS updates,
  the Sherman-Morrison-Woodbury kernel, block CG, tensor-mode contractions, the
  Levenberg-Marquardt controller).
* ``layers``, ``losses``, ``ggn``, ``safety``: layer partition and matching, losses with
  sampling, Gauss-Newton products, and the non-finite guard.
* one module per method: ``kfac``, ``kbfgs``, ``tnt``, ``shampoo``, ``smw``,
  ``hessian_free``; they never import each other. ``alias`` builds every method's alias.
* ``capture``, ``capture_linen``, ``capture_nnx``, ``train``: the Flax side (the only modules
  that import Flax), exposed as :mod:`kfqn_jax.flax`.
"""

from kfqn_jax._src import losses as losses
from kfqn_jax._src.base import ConvSpec as ConvSpec
from kfqn_jax._src.base import LayerMeta as LayerMeta
from kfqn_jax._src.base import LayerStats as LayerStats
from kfqn_jax._src.coverage import CoverageReport as CoverageReport
from kfqn_jax._src.coverage import coverage_report as coverage_report
from kfqn_jax._src.extra_args import Requirements as Requirements
from kfqn_jax._src.extra_args import requirements as requirements
from kfqn_jax._src.hessian_free import ScaleByHessianFreeState as ScaleByHessianFreeState
from kfqn_jax._src.hessian_free import block_hessian_free as block_hessian_free
from kfqn_jax._src.hessian_free import hessian_free as hessian_free
from kfqn_jax._src.hessian_free import scale_by_hessian_free as scale_by_hessian_free
from kfqn_jax._src.kbfgs import ScaleByKBFGSState as ScaleByKBFGSState
from kfqn_jax._src.kbfgs import kbfgs as kbfgs
from kfqn_jax._src.kbfgs import kbfgs_l as kbfgs_l
from kfqn_jax._src.kbfgs import scale_by_kbfgs as scale_by_kbfgs
from kfqn_jax._src.kbfgs import scale_by_kbfgs_l as scale_by_kbfgs_l
from kfqn_jax._src.kfac import ScaleByKFACState as ScaleByKFACState
from kfqn_jax._src.kfac import kfac as kfac
from kfqn_jax._src.kfac import scale_by_kfac as scale_by_kfac
from kfqn_jax._src.sampled import value_and_sampled_grad as value_and_sampled_grad
from kfqn_jax._src.shampoo import ScaleByShampooState as ScaleByShampooState
from kfqn_jax._src.shampoo import scale_by_shampoo as scale_by_shampoo
from kfqn_jax._src.shampoo import shampoo as shampoo
from kfqn_jax._src.smw import OutputProbe as OutputProbe
from kfqn_jax._src.smw import ScaleBySMWState as ScaleBySMWState
from kfqn_jax._src.smw import scale_by_smw_gn as scale_by_smw_gn
from kfqn_jax._src.smw import scale_by_smw_ng as scale_by_smw_ng
from kfqn_jax._src.smw import smw_gn as smw_gn
from kfqn_jax._src.smw import smw_ng as smw_ng
from kfqn_jax._src.tnt import ScaleByTNTState as ScaleByTNTState
from kfqn_jax._src.tnt import scale_by_tnt as scale_by_tnt
from kfqn_jax._src.tnt import tnt as tnt

__version__ = "0.2.0.dev0"

__all__ = [
    # Methods: aliases with a learning rate (sorted).
    "block_hessian_free",
    "hessian_free",
    "kbfgs",
    "kbfgs_l",
    "kfac",
    "shampoo",
    "smw_gn",
    "smw_ng",
    "tnt",
    # Methods: scale_by_* transforms without learning rate (sorted).
    "scale_by_hessian_free",
    "scale_by_kbfgs",
    "scale_by_kbfgs_l",
    "scale_by_kfac",
    "scale_by_shampoo",
    "scale_by_smw_gn",
    "scale_by_smw_ng",
    "scale_by_tnt",
    # Optimizer states (sorted).
    "ScaleByHessianFreeState",
    "ScaleByKBFGSState",
    "ScaleByKFACState",
    "ScaleBySMWState",
    "ScaleByShampooState",
    "ScaleByTNTState",
    # The extra-args protocol and statistics (sorted).
    "ConvSpec",
    "LayerMeta",
    "LayerStats",
    "OutputProbe",
    "Requirements",
    "requirements",
    "value_and_sampled_grad",
    # Losses and diagnostics (sorted).
    "CoverageReport",
    "coverage_report",
    "losses",
]
