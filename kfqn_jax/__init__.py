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
from kfqn_jax._src.kfac import ScaleByKFACState as ScaleByKFACState
from kfqn_jax._src.kfac import kfac as kfac
from kfqn_jax._src.kfac import scale_by_kfac as scale_by_kfac

__version__ = "0.1.0.dev0"

__all__ = [
    "ConvSpec",
    "CoverageReport",
    "coverage_report",
    "LayerMeta",
    "LayerStats",
    "ScaleByKFACState",
    "kfac",
    "losses",
    "scale_by_kfac",
]
