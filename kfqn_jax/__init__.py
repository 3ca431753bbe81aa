"""kfqn_jax: practical second-order optimizers for JAX, as optax transformations.

Each method is an ``optax.GradientTransformationExtraArgs``; per-layer statistics come from the
Flax capture in :mod:`kfqn_jax.flax`.
"""

from kfqn_jax._src import losses as losses
from kfqn_jax._src.base import ConvSpec as ConvSpec
from kfqn_jax._src.base import LayerMeta as LayerMeta
from kfqn_jax._src.base import LayerStats as LayerStats
from kfqn_jax._src.coverage import CoverageReport as CoverageReport
from kfqn_jax._src.coverage import coverage_report as coverage_report
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

__version__ = "0.1.0.dev0"

__all__ = [
    "ScaleByShampooState",
    "ScaleByTNTState",
    "scale_by_shampoo",
    "scale_by_tnt",
    "shampoo",
    "tnt",
    "value_and_sampled_grad",
    "ConvSpec",
    "CoverageReport",
    "coverage_report",
    "LayerMeta",
    "LayerStats",
    "ScaleByHessianFreeState",
    "ScaleByKBFGSState",
    "ScaleByKFACState",
    "block_hessian_free",
    "hessian_free",
    "kbfgs",
    "kbfgs_l",
    "kfac",
    "losses",
    "scale_by_hessian_free",
    "scale_by_kbfgs",
    "scale_by_kbfgs_l",
    "scale_by_kfac",
    "OutputProbe",
    "ScaleBySMWState",
    "scale_by_smw_gn",
    "scale_by_smw_ng",
    "smw_gn",
    "smw_ng",
]
