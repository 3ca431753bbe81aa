"""Flax integration: statistics capture for linen and NNX models, and training helpers.

This is the only public module of kfqn_jax that imports Flax.
"""

from kfqn_jax._src.capture import Captured as Captured
from kfqn_jax._src.capture_linen import layer_metas as layer_metas
from kfqn_jax._src.capture_linen import layer_stats as layer_stats
from kfqn_jax._src.capture_linen import value_grads_and_stats as value_grads_and_stats
from kfqn_jax._src.capture_nnx import nnx_layer_metas as nnx_layer_metas
from kfqn_jax._src.capture_nnx import nnx_layer_stats as nnx_layer_stats
from kfqn_jax._src.capture_nnx import nnx_value_grads_and_stats as nnx_value_grads_and_stats
from kfqn_jax._src.train import TrainState as TrainState
from kfqn_jax._src.train import make_nnx_train_step as make_nnx_train_step
from kfqn_jax._src.train import make_train_step as make_train_step

__all__ = [
    # Linen capture.
    "Captured",
    "layer_metas",
    "layer_stats",
    "value_grads_and_stats",
    # NNX capture.
    "nnx_layer_metas",
    "nnx_layer_stats",
    "nnx_value_grads_and_stats",
    # Training.
    "TrainState",
    "make_nnx_train_step",
    "make_train_step",
]
