"""Flax integration: statistics capture for linen and NNX models, and training helpers.

This is the only public module of kfqn_jax that imports Flax.
"""

from kfqn_jax._src.capture import Captured as Captured
from kfqn_jax._src.capture_linen import layer_metas as layer_metas
from kfqn_jax._src.capture_linen import layer_stats as layer_stats
from kfqn_jax._src.capture_linen import value_grads_and_stats as value_grads_and_stats
from kfqn_jax._src.capture_nnx import nnx_layer_metas as nnx_layer_metas
from kfqn_jax._src.capture_nnx import nnx_value_grads_and_stats as nnx_value_grads_and_stats
from kfqn_jax._src.train import TrainState as TrainState
from kfqn_jax._src.train import make_train_step as make_train_step

__all__ = [
    "Captured",
    "TrainState",
    "layer_metas",
    "layer_stats",
    "make_train_step",
    "nnx_layer_metas",
    "nnx_value_grads_and_stats",
    "value_grads_and_stats",
]
