"""The benchmark problem zoo: Flax linen models, losses, data and the papers' settings.

Every problem is a :class:`Problem`. Build one with :func:`make_problem`::

    problem = make_problem("mnist_ae", quick=True)   # embedded MNIST subset, no download

Initialisation is Flax's default everywhere (``Dense``/``Conv``: LeCun-normal kernels, zero
biases). The authors' PyTorch code initialises differently (PyTorch defaults or their own
schemes, not verified here), so absolute early-training numbers will differ from their plots.

``paper_settings`` holds per-optimizer hyperparameters taken from the papers and the authors'
public code (listed in benchmarks/README.md, References; each ``"source"`` names its origin,
and says "ours" where the sources give no value). The benchmark runner uses
them as defaults; keys that a factory does not accept are simply not passed (the runner's
builders pick what they need).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import data as data_lib
from kfqn_jax._src import losses

__all__ = ["Problem", "PROBLEMS", "make_problem", "MLP", "Autoencoder", "CNN2c2d"]


# ----------------------------------------------------------------------------------------------
# Models.


class MLP(nn.Module):
    """Dense layers of ``widths`` with ``activation`` after every layer except those listed
    in ``linear`` (indices into ``widths``); the last layer is always linear (logits)."""

    widths: Sequence[int]
    activation: Callable[[Any], Any] = nn.relu
    linear: Sequence[int] = ()
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        last = len(self.widths) - 1
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, use_bias=self.use_bias)(x)
            if i != last and i not in self.linear:
                x = self.activation(x)
        return x


def Autoencoder(encoder: Sequence[int], out_dim: int, activation=nn.relu) -> MLP:
    """Symmetric deep autoencoder ``in-e1-...-code-...-e1-out``.

    ``encoder`` lists the hidden widths down to the code layer. The code layer and the output
    layer are linear (K-BFGS/TNT code); the output is logits for the BCE problems and the
    reconstruction itself for squared error.
    """
    widths = list(encoder) + list(reversed(encoder[:-1])) + [out_dim]
    return MLP(widths=tuple(widths), activation=activation, linear=(len(encoder) - 1,))


class CNN2c2d(nn.Module):
    """DeepOBS ``2c2d``: conv(32, 5x5, SAME)-maxpool(2)-conv(64, 5x5, SAME)-maxpool(2)-
    dense(1024)-dense(classes), ReLU. Flax default init (DeepOBS uses its own; not copied)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = nn.relu(nn.Conv(64, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(self.num_classes)(x)


# ----------------------------------------------------------------------------------------------
# The Problem record.


def _reconstruct(x, y):
    del y
    return x


def _labels(x, y):
    del x
    return y


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem.

    Attributes:
      name: the problem's name (``mnist_ae``, ...).
      model: a linen Module; ``model.apply({"params": params}, x)`` gives the outputs.
      loss: a ``kfqn_jax`` loss object, ``loss(outputs, targets) -> mean loss``.
      x_train, y_train, x_test, y_test: numpy arrays (``y_*`` is ``None`` for autoencoders).
        Inputs are float32 in [0, 1], flattened for MLPs and ``(n, 28, 28, 1)`` for CNNs.
      targets_of: ``(x, y) -> targets`` for ``loss``; autoencoders reconstruct ``x``.
      batch_size: minibatch size of the papers (or of the quick variant).
      paper_settings: ``{optimizer name: {hyperparameter: value, "source": str}}``.
      task: ``"autoencoder"`` or ``"classification"``.
      data_source: provenance of the data (proxies say so).
      notes: deviations from the papers worth knowing when reading results.
    """

    name: str
    model: nn.Module
    loss: Any
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    targets_of: Callable[[Any, Any], Any]
    batch_size: int
    paper_settings: dict[str, dict[str, Any]]
    task: str = "autoencoder"
    data_source: str = ""
    notes: str = ""
    init: str = "flax"

    def __post_init__(self):
        if self.init not in ("flax", "torch"):
            raise ValueError(f"init must be 'flax' or 'torch', got {self.init!r}")

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    def init_params(self, rng):
        """``variables["params"]`` of the model for a key ``rng``.

        ``init="torch"`` redraws every Dense/Conv kernel and bias from
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default for ``nn.Linear`` and
        ``nn.Conv2d``, which the authors' code uses. With Flax's default (LeCun normal kernels,
        zero biases) the papers' K-BFGS learning rate 0.3 diverged on the MNIST autoencoder
        within ten steps; with this init it trains.
        """
        x = jnp.asarray(self.x_train[:1])
        params = self.model.init(rng, x)["params"]
        if self.init == "flax":
            return params
        return torch_default_init(params, rng)


def torch_default_init(params, rng):
    """Redraws each ``kernel`` and its sibling ``bias`` from ``U(-b, b)``, ``b = 1/sqrt(fan_in)``
    with ``fan_in = prod(kernel.shape[:-1])`` (PyTorch's default layer initialisation)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = [tuple(getattr(k, "key", k) for k in path) for path, _ in flat]
    fan_in = {
        k[:-1]: int(np.prod(leaf.shape[:-1]))
        for k, (_, leaf) in zip(keys, flat, strict=True)
        if k[-1] == "kernel"
    }
    rngs = jax.random.split(rng, len(flat))
    out = []
    for k, (_, leaf), r in zip(keys, flat, rngs, strict=True):
        if k[-1] in ("kernel", "bias") and k[:-1] in fan_in:
            bound = 1.0 / np.sqrt(fan_in[k[:-1]])
            out.append(jax.random.uniform(r, leaf.shape, leaf.dtype, -bound, bound))
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), out)


# ----------------------------------------------------------------------------------------------
# Paper settings (the papers and the authors' code: benchmarks/README.md, References).

# Standard optax Adam, lr 1e-3: the best of {1e-4, 3e-4, 1e-3, 3e-3} on the quick MNIST AE
# (400 steps, batch 250, final train loss 107 / 86 / 78 / 92). The TNT demo's 1e-4 is for the
# authors' Adam variant (eps 1e-4; "adam_authors" in benchmarks/optimizers.py).
_ADAM = {"learning_rate": 1e-3, "source": "optax.adam, lr 1e-3 (grid on quick mnist_ae)"}
_SGD = {
    "learning_rate": 3e-3,
    "momentum": 0.9,
    "source": "TNT repo SGD-m demo (arXiv 2106.02925 code)",
}

_AE_SETTINGS: dict[str, dict[str, Any]] = {
    "adam": _ADAM,
    "sgd": _SGD,
    # K-BFGS repo KFAC baseline (arXiv 2006.08877 code): lr 1 and lambda 3 with sqrt(lambda)
    # added to A and G (pi = 1), factor EMA 0.9, inverses every 20 steps (and at every step while
    # k <= 20), momentum 0.9 as an EMA (1 - rho weighting). kfqn_jax.kfac's momentum is
    # heavy-ball (m <- mu m + g, i.e. 1 / (1 - mu) = 10x larger), so lr 1 there is lr 0.1 here.
    "kfac": {
        "learning_rate": 0.1,
        "damping": 3.0,
        "momentum": 0.9,
        "ema_decay": 0.9,
        "pi_damping": False,
        "stats_every": 1,
        "inverse_every": 20,
        "source": "K-BFGS repo KFAC demo (arXiv 2006.08877 code), lr 1 with EMA momentum, "
        "lambda 3",
    },
    "kbfgs": {
        "learning_rate": 0.3,
        "damping": 0.3,
        "momentum": 0.9,
        "source": "K-BFGS demo code (arXiv 2006.08877), lr 0.3, lambda 0.3",
    },
    "kbfgs_l": {
        "learning_rate": 0.3,
        "damping": 0.3,
        "momentum": 0.9,
        "memory_size": 100,
        "source": "K-BFGS(L) demo code (arXiv 2006.08877), lr 0.3, lambda 0.3, L = 100",
    },
    "tnt": {
        "learning_rate": 1e-4,
        "damping": 0.1,
        "momentum": 0.9,
        "stats_every": 1,
        "inverse_every": 20,
        "source": "TNT demo code (arXiv 2106.02925), lr 1e-4, eps 0.1, T1 1, T2 20",
    },
    "shampoo": {
        "learning_rate": 3e-4,
        "damping": 3e-4,
        "inverse_every": 20,
        "source": "TNT repo Shampoo MNIST demo (arXiv 2106.02925 code), lr 3e-4, eps 3e-4, T2 20",
    },
    # SMW: neither the paper nor the authors' code gives defaults (our choice). Best of a short
    # search on the full MNIST AE (100 steps; benchmarks/RESULTS.md, SMW section). With the
    # authors' 1.01 rule any lambda_0 small enough to make progress diverged within a few steps,
    # so lambda adapts by 1.5 and steps that raise the loss are rejected (lm_reject). A
    # curvature batch of 128 leaves most of the gradient outside the solved subspace (a plain
    # SGD step there): SMW-NG uses the whole batch, SMW-GN 500 examples with 4 sign-sketch
    # probes of the 784 outputs.
    "smw_ng": {
        "damping": 3.0,
        "lm_factor": 1.5,
        "lm_reject": True,
        "curvature_batch": 1000,
        "source": "SMW-NG (arXiv 1906.02353), no defaults there; ours: lambda_0 3, LM factor "
        "1.5 with rejection, m = batch (short search, benchmarks/RESULTS.md)",
    },
    "smw_gn": {
        "damping": 3.0,
        "lm_factor": 1.5,
        "lm_reject": True,
        "curvature_batch": 500,
        "output_samples": 4,
        "output_sampling": "sketch",
        "source": "SMW-GN (arXiv 1906.02353), no defaults there; ours: lambda_0 3, LM factor "
        "1.5 with rejection, m 500, 4 sketched output probes (short search, "
        "benchmarks/RESULTS.md)",
    },
    "hessian_free": {
        "damping": 45.0,
        "max_cg_iters": 250,
        "source": "Martens (ICML 2010) HF demo code, initial lambda 45, 250 CG iters",
    },
    "block_hessian_free": {
        "max_cg_iters": 20,
        "source": "Block-diagonal HF (arXiv 1712.07296), constants not stated there; ours: CG "
        "cap 20 per block (cap 50 was better per step but slower per second on a 2-core CPU)",
    },
}

_MLP_SETTINGS: dict[str, dict[str, Any]] = {
    **_AE_SETTINGS,
    # The SMW code's MLP (arXiv 1906.02353). lambda_0 1 with the authors' 1.01 rule; SMW-NG
    # with the authors' gradient momentum 0.9 (without it, it trailed Adam after 100 steps).
    "smw_ng": {
        "damping": 1.0,
        "momentum": 0.9,
        "source": "SMW-NG (arXiv 1906.02353), no defaults there; ours: lambda_0 1, authors' LM "
        "rule, momentum 0.9 (benchmarks/RESULTS.md)",
    },
    "smw_gn": {
        "damping": 1.0,
        "source": "SMW-GN (arXiv 1906.02353), no defaults there; ours: lambda_0 1, authors' LM "
        "rule (benchmarks/RESULTS.md)",
    },
}

_CNN_SETTINGS: dict[str, dict[str, Any]] = {
    "adam": _ADAM,
    "sgd": {
        "learning_rate": 0.03,
        "momentum": 0.9,
        "source": "TNT repo CIFAR SGD-m (arXiv 2106.02925 code)",
    },
    "kfac": {
        "learning_rate": 0.003,
        "damping": 0.3,
        "momentum": 0.9,
        "ema_decay": 0.9,
        "pi_damping": False,
        "stats_every": 10,
        "inverse_every": 100,
        "source": (
            "TNT repo KFAC (arXiv 2106.02925 code): lr 0.003, lambda 0.3 (its MNIST demo values), "
            "T_cov 10 / T_inv 100 (its CNN setting); heavy-ball momentum as there"
        ),
    },
    "tnt": {
        "learning_rate": 1e-4,
        "damping": 0.01,
        "momentum": 0.9,
        "stats_every": 10,
        "inverse_every": 100,
        "source": "TNT CNN demo code (arXiv 2106.02925), lr 1e-4, eps 0.01, T1 10, T2 100",
    },
    "shampoo": {
        "learning_rate": 0.01,
        "damping": 0.01,
        "inverse_every": 100,
        "source": "TNT repo Shampoo CIFAR-10 demo (arXiv 2106.02925 code), lr 0.01, eps 0.01",
    },
}


def _settings(base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in base.items()}


# ----------------------------------------------------------------------------------------------
# Builders.


def _subset(d: data_lib.Dataset, n_train: int | None, n_test: int | None) -> data_lib.Dataset:
    def cut(a, n):
        return a if (a is None or n is None) else a[:n]

    return data_lib.Dataset(
        cut(d.x_train, n_train),
        cut(d.y_train, n_train),
        cut(d.x_test, n_test),
        cut(d.y_test, n_test),
        d.source,
    )


def _mnist(quick: bool, data_dir) -> data_lib.Dataset:
    return data_lib.load_embedded_mnist() if quick else data_lib.load_mnist(data_dir)


def mnist_ae(quick: bool = False, data_dir=None) -> Problem:
    """MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784.

    The autoencoder of Hinton & Salakhutdinov (Science 2006) as used in the K-BFGS paper (arXiv
    2006.08877). ReLU, linear code and output layers, sigmoid BCE summed over pixels and
    averaged over the batch, batch 1000 (250 in the quick variant, which uses the embedded
    5000/1000 subset).
    """
    d = _mnist(quick, data_dir)
    return Problem(
        name="mnist_ae",
        model=Autoencoder([1000, 500, 250, 30], 784),
        loss=losses.sigmoid_cross_entropy(),
        x_train=d.x_train,
        y_train=None,
        x_test=d.x_test,
        y_test=None,
        targets_of=_reconstruct,
        batch_size=250 if quick else 1000,
        paper_settings=_settings(_AE_SETTINGS),
        data_source=d.source,
        notes="Flax default init; no L2 term (the K-BFGS code adds tau = 1e-5 via the gradient).",
    )


def curves_ae(quick: bool = False, data_dir=None) -> Problem:
    """CURVES-like deep autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784.

    ReLU as in the K-BFGS code, linear code and output, sigmoid BCE summed over pixels, batch
    1000. Data: the procedural CURVES-like set (20k/10k; 2000/500 in the quick variant).
    """
    if quick:
        d = data_lib.Dataset(
            data_lib.make_curves(2000, seed=1),
            None,
            data_lib.make_curves(500, seed=2),
            None,
            "CURVES-like procedural (benchmarks/README.md, Data sources), a proxy",
        )
    else:
        d = data_lib.load_curves(data_dir)
    return Problem(
        name="curves_ae",
        model=Autoencoder([400, 200, 100, 50, 25, 6], 784),
        loss=losses.sigmoid_cross_entropy(),
        x_train=d.x_train,
        y_train=None,
        x_test=d.x_test,
        y_test=None,
        targets_of=_reconstruct,
        batch_size=250 if quick else 1000,
        paper_settings=_settings(_AE_SETTINGS),
        data_source=d.source,
        notes="CURVES-like proxy data: do not compare absolute losses with published CURVES.",
    )


def faces_ae(quick: bool = False, data_dir=None) -> Problem:
    """FACES-like deep autoencoder 625-2000-1000-500-30-500-1000-2000-625, squared error.

    ReLU, linear code and output, 0.5 * SSE summed over pixels, batch 1000. Data: the FACES
    proxy from scikit-image's LFW faces (103,500/41,400; 5000/1000 in the quick variant).
    """
    del data_dir
    d = make_faces(quick)
    return Problem(
        name="faces_ae",
        model=Autoencoder([2000, 1000, 500, 30], 625),
        loss=losses.squared_error(),
        x_train=d.x_train,
        y_train=None,
        x_test=d.x_test,
        y_test=None,
        targets_of=_reconstruct,
        batch_size=250 if quick else 1000,
        paper_settings=_settings(_AE_SETTINGS),
        data_source=d.source,
        notes="FACES-like proxy data (100 LFW identities); inputs in [0, 1], not standardised.",
    )


def make_faces(quick: bool) -> data_lib.Dataset:
    if quick:
        return data_lib.make_faces_proxy(5000, 1000, seed=0)
    return data_lib.make_faces_proxy(seed=0)


def fmnist_2c2d(quick: bool = False, data_dir=None) -> Problem:
    """Fashion-MNIST with the DeepOBS 2c2d CNN, softmax cross-entropy, batch 128.

    Needs Debian's ``dataset-fashion-mnist``. The quick variant uses the first 5000/1000.
    """
    del data_dir
    d = data_lib.load_fashion_mnist()
    if quick:
        d = _subset(d, 5000, 1000)
    return Problem(
        name="fmnist_2c2d",
        model=CNN2c2d(10),
        loss=losses.softmax_cross_entropy(),
        x_train=d.x_train.reshape(-1, 28, 28, 1),
        y_train=d.y_train,
        x_test=d.x_test.reshape(-1, 28, 28, 1),
        y_test=d.y_test,
        targets_of=_labels,
        batch_size=128,
        paper_settings=_settings(_CNN_SETTINGS),
        task="classification",
        data_source=d.source,
        notes="DeepOBS 2c2d architecture with Flax default init (DeepOBS's init not copied).",
    )


def mnist_mlp(quick: bool = False, data_dir=None) -> Problem:
    """MNIST 784-500-10 classifier, ReLU, softmax CE, no biases (SMW code, arXiv 1906.02353)."""
    d = _mnist(quick, data_dir)
    return Problem(
        name="mnist_mlp",
        model=MLP(widths=(500, 10), use_bias=False),
        loss=losses.softmax_cross_entropy(),
        x_train=d.x_train,
        y_train=d.y_train,
        x_test=d.x_test,
        y_test=d.y_test,
        targets_of=_labels,
        batch_size=250 if quick else 1000,
        paper_settings=_settings(_MLP_SETTINGS),
        task="classification",
        data_source=d.source,
        notes="No biases, as in the SMW code; the activation (ReLU) is our choice (not stated "
        "in the paper).",
    )


def tiny_ae(quick: bool = True, data_dir=None) -> Problem:
    """A small 784-64-8-64-784 autoencoder on the embedded MNIST subset (tests, smoke runs)."""
    del quick, data_dir
    d = _subset(data_lib.load_embedded_mnist(), 1000, 200)
    return Problem(
        name="tiny_ae",
        model=Autoencoder([64, 8], 784),
        loss=losses.sigmoid_cross_entropy(),
        x_train=d.x_train,
        y_train=None,
        x_test=d.x_test,
        y_test=None,
        targets_of=_reconstruct,
        batch_size=100,
        paper_settings=_settings(_AE_SETTINGS),
        data_source=d.source,
        notes="Not a paper problem: a fast stand-in for tests.",
    )


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mnist_ae": mnist_ae,
    "curves_ae": curves_ae,
    "faces_ae": faces_ae,
    "fmnist_2c2d": fmnist_2c2d,
    "mnist_mlp": mnist_mlp,
    "tiny_ae": tiny_ae,
}


def make_problem(name: str, quick: bool = False, data_dir=None) -> Problem:
    """Builds problem ``name`` (one of :data:`PROBLEMS`); ``quick`` picks the small variant."""
    if name not in PROBLEMS:
        raise ValueError(f"Unknown problem {name!r}; choose from {sorted(PROBLEMS)}.")
    return PROBLEMS[name](quick=quick, data_dir=data_dir)


# ----------------------------------------------------------------------------------------------
# Character-level LSTM (block-diagonal HF, arXiv 1712.07296, trains "multilayer LSTMs").

# Fixed list of standard-library modules whose sources form the corpus (present wherever
# Python is installed; read through os.path.dirname(os.__file__)).
_CHAR_CORPUS = (
    "argparse.py",
    "textwrap.py",
    "difflib.py",
    "functools.py",
    "string.py",
    "shutil.py",
    "pathlib.py",
    "dataclasses.py",
)


class CharLSTM(nn.Module):
    """Byte embedding -> ``layers`` LSTM layers (``flax.linen.LSTMCell`` under ``nn.RNN``) ->
    Dense logits over the 256 byte values. Inputs are byte ids (any dtype; cast to int)."""

    hidden: int = 64
    embed: int = 32
    layers: int = 2

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(256, self.embed)(x.astype(jnp.int32))
        for _ in range(self.layers):
            h = nn.RNN(nn.LSTMCell(self.hidden))(h)
        return nn.Dense(256)(h)


def char_corpus() -> bytes:
    """The concatenated sources of :data:`_CHAR_CORPUS` (bytes)."""
    import os

    root = os.path.dirname(os.__file__)
    parts = []
    for name in _CHAR_CORPUS:
        with open(os.path.join(root, name), "rb") as f:
            parts.append(f.read())
    return b"\n".join(parts)


def char_lstm(
    quick: bool = False, data_dir=None, hidden: int = 64, name: str = "char_lstm"
) -> Problem:
    """2-layer LSTM (64 units, byte embedding 32) predicting the next byte of Python sources.

    Non-overlapping windows of 33 bytes: inputs are the first 32, targets the last 32
    (softmax cross-entropy, mean over positions). The last 10% of windows are the test set.
    Quick: 4000 training windows. Not a paper problem (the LSTM data and sizes of the BDHF paper,
    arXiv 1712.07296, are not public); a CPU-sized stand-in. ``hidden`` sets the LSTM width and
    ``name`` the problem's name (``char_lstm_wide``: 128 units, same data and optimizer settings).
    """
    del data_dir
    seq = 32
    data = np.frombuffer(char_corpus(), np.uint8)
    n = len(data) // (seq + 1)
    windows = data[: n * (seq + 1)].reshape(n, seq + 1).astype(np.int64)
    perm = np.random.default_rng(0).permutation(n)
    windows = windows[perm]
    n_test = n // 10
    train, test = windows[n_test:], windows[:n_test]
    if quick:
        train, test = train[:4000], test[:500]
    settings = {
        "adam": {"learning_rate": 3e-3, "source": "optax.adam, lr 3e-3 (common char-LSTM value)"},
        "sgd": dict(_SGD),
        "hessian_free": {
            "damping": 1.0,
            "min_damping": 1e-3,
            "max_cg_iters": 10,
            "curvature_fraction": 0.1,
            "source": "Martens (ICML 2010) HF machinery; ours, tuned per second on "
            "caps {5, 10, 20} x curvature batch {1/10, 1/4} (benchmarks/RESULTS.md): CG cap 10, "
            "curvature batch 1/10 of the gradient batch; damping floor 1e-3 (without it the "
            "damping falls to 1e-6 and block-diagonal HF's loss rises after ~100 steps)",
        },
        "block_hessian_free": {
            "damping": 1.0,
            "min_damping": 1e-3,
            "max_cg_iters": 10,
            "curvature_fraction": 0.1,
            "blocks": "lstm_stack",
            "source": "Block-diagonal HF (arXiv 1712.07296), constants not stated there; ours: "
            "one block per LSTM layer "
            "(the embedding with the first) and the output layer; CG cap 10, curvature batch "
            "1/10 and damping floor 1e-3, tuned on the same grid as HF",
        },
    }
    return Problem(
        name=name,
        model=CharLSTM(hidden=hidden),
        loss=losses.softmax_cross_entropy(),
        x_train=train[:, :-1].astype(np.float32),
        y_train=train[:, 1:],
        x_test=test[:, :-1].astype(np.float32),
        y_test=test[:, 1:],
        targets_of=_labels,
        batch_size=1000 if not quick else 500,
        paper_settings=settings,
        task="classification",
        data_source="CPython standard library sources: " + ", ".join(_CHAR_CORPUS),
        notes="Byte ids are stored as float32 inputs (the runner casts x); the model casts back.",
    )


PROBLEMS["char_lstm"] = char_lstm


def char_lstm_wide(quick: bool = False, data_dir=None) -> Problem:
    """:func:`char_lstm` with 128 LSTM units (255,232 parameters against 82,688), same data and
    optimizer settings (not re-tuned)."""
    return char_lstm(quick=quick, data_dir=data_dir, hidden=128, name="char_lstm_wide")


PROBLEMS["char_lstm_wide"] = char_lstm_wide
