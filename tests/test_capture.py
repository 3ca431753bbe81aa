"""The Flax capture is exact: captured ``a`` and ``g`` reproduce ``jax.grad`` of every kernel.

For every layer kind (linen ``Dense``, ``DenseGeneral``, ``Conv`` 1-3-D with all padding modes,
strides and dilations, ``Embed``; NNX ``Linear``, ``Conv``, ``Embed``) the statistics captured
under ``jit`` satisfy, in float64 (``jax.enable_x64``):

* kernel gradient ``= sum_{b,t} a[b,t]^T g[b,t]`` (embeddings: scatter-add of ``g`` at the ids);
* bias gradient ``= sum_{b,t} g[b,t]``;
* ``h`` is the layer output and ``a W (+ b) = h`` (so conv patches are in Flax kernel order).

One "zoo" model per framework holds all the layers, so each zoo compiles once (module-scoped
fixtures); the per-layer checks are numpy on the fixture's results.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfqn_jax
from kfqn_jax import flax as kfx
from kfqn_jax import losses

RTOL, ATOL = 1e-10, 1e-12  # float64
B = 3


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def _close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol, atol, err_msg=err_msg)


def _stats_kernel_grad(s):
    """``sum_{b,t} a^T g`` in the kernel leaf's shape (scatter-add at the ids for embeddings)."""
    a, g = np.asarray(s.a), np.asarray(s.g)
    if s.meta.kind == "embed":
        out = np.zeros(s.meta.kernel_shape, g.dtype)
        np.add.at(out, a.reshape(-1), g.reshape(-1, g.shape[-1]))
        return out
    return np.einsum("bti,bto->io", a, g).reshape(s.meta.kernel_shape)


def _stats_layer_output(s, params):
    """``a W (+ b)`` (``W[a]`` for embeddings), shape ``(B, T, d_out)``."""
    a = np.asarray(s.a)
    w = _leaf(params, s.meta.kernel_path)
    if s.meta.kind == "embed":
        return w[a]
    out = a @ w.reshape(s.meta.in_features, s.meta.out_features)
    if s.meta.has_bias:
        out = out + _leaf(params, s.meta.bias_path).reshape(-1)
    return out


def _check_layer_grads(s, grads, params):
    meta = s.meta
    assert _leaf(params, meta.kernel_path).shape == meta.kernel_shape
    assert s.a.shape[:2] == s.g.shape[:2]
    assert s.g.shape[-1] == meta.out_features
    if meta.kind != "embed":
        assert s.a.shape[-1] == meta.in_features
    _close(_stats_kernel_grad(s), _leaf(grads, meta.kernel_path), err_msg=meta.name)
    if meta.has_bias:
        bias_grad = np.asarray(s.g).sum(axis=(0, 1))
        _close(bias_grad, _leaf(grads, meta.bias_path).reshape(-1), err_msg=meta.name)


def _tree_close(actual, desired, **kw):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        _close(x, y, **kw)


# ---------------------------------------------------------------------------------------------
# Linen: every layer kind in one model


def _dense_layers():
    p = functools.partial
    return {
        # name: (kind, module factory, input key, batched)
        "dense": ("dense", p(nn.Dense, 3), "vec", True),
        "dense_seq_nobias": ("dense", p(nn.Dense, 3, use_bias=False), "seq", True),
        "dense_unbatched": ("dense", p(nn.Dense, 2), "vec0", False),
        "dg_multi": ("dense", p(nn.DenseGeneral, (2, 3), axis=(-2, -1)), "seq", True),
        "dg_reversed": ("dense", p(nn.DenseGeneral, 5, axis=(-1, -2)), "seq", True),
        "dg_middle": ("dense", p(nn.DenseGeneral, (2, 2), axis=1, use_bias=False), "seq", True),
    }


def _conv_layers():
    # Each layer combines several features, to keep the zoo (one compile) small.
    c = functools.partial(functools.partial, nn.Conv)
    return {
        "c1_same_lower_batch_axes": ("conv", c(2, (2,), padding="SAME_LOWER"), "l1b", True),
        "c1_valid_stride_nobias": (
            "conv",
            c(3, 3, strides=2, padding="VALID", use_bias=False),
            "l1",
            True,
        ),
        "c1_causal_kdil": ("conv", c(3, (3,), padding="CAUSAL", kernel_dilation=2), "l1", True),
        "c1_circular_stride": ("conv", c(2, (4,), padding="CIRCULAR", strides=2), "l1", True),
        "c1_reflect": ("conv", c(2, (3,), padding="REFLECT"), "l1", True),
        "c1_int_indil_unbatched": ("conv", c(2, (3,), padding=1, input_dilation=2), "l10", False),
        "c2_same_stride": ("conv", c(3, (3, 3), strides=(2, 1), padding="SAME"), "i2", True),
        "c2_pairs_dil_nobias": (
            "conv",
            c(
                2,
                (2, 3),
                padding=((1, 0), (2, 1)),
                kernel_dilation=(1, 2),
                input_dilation=(2, 1),
                use_bias=False,
            ),
            "i2",
            True,
        ),
        "c2_circular": ("conv", c(2, (2, 3), padding="CIRCULAR"), "i2", True),
        "c3_same_stride": ("conv", c(2, (2, 2, 2), strides=(1, 2, 1), padding="SAME"), "v3", True),
        "c3_ints_kdil_nobias": (
            "conv",
            c(2, (2, 2, 2), padding=(1, 0, 1), kernel_dilation=(2, 1, 1), use_bias=False),
            "v3",
            True,
        ),
    }


def _embed_layers():
    return {
        "emb": ("embed", functools.partial(nn.Embed, 7, 3), "ids", True),
        "emb_axes": ("embed", functools.partial(nn.Embed, 5, 2), "ids2", True),
        "emb_unbatched": ("embed", functools.partial(nn.Embed, 5, 2), "ids0", False),
    }


LINEN_LAYERS = {**_dense_layers(), **_conv_layers(), **_embed_layers()}
# Layers outside the table: a Dense called twice (shared weights) and a rematerialised Dense.
LINEN_EXTRA = {"shared": ("dense", 2), "remat_dense": ("dense", 1)}
LINEN_NAMES = list(LINEN_LAYERS) + list(LINEN_EXTRA)  # call order


class LinenZoo(nn.Module):
    @nn.compact
    def __call__(self, x):
        outs = []

        def add(y, batched=True):
            y = jnp.tanh(y)
            if batched:
                outs.append(y.reshape(B, -1))
            else:  # an unbatched layer's output feeds every example
                outs.append(jnp.broadcast_to(y.reshape(1, -1), (B, y.size)))

        for name, (_, make, key, batched) in LINEN_LAYERS.items():
            add(make(name=name)(x[key]), batched)
        shared = nn.Dense(4, name="shared")
        add(shared(jnp.tanh(shared(x["vec"]))))
        add(nn.remat(nn.Dense)(3, name="remat_dense")(x["vec"]))
        return jnp.concatenate(outs, axis=-1)


def _zoo_inputs():
    """Float64 numpy inputs (numpy, not jax.random: no eager compiles)."""
    rng = np.random.default_rng(0)
    x = {
        "vec": rng.normal(size=(B, 4)),
        "seq": rng.normal(size=(B, 2, 3, 4)),
        "l1": rng.normal(size=(B, 7, 2)),
        "l1b": rng.normal(size=(B, 2, 7, 2)),
        "i2": rng.normal(size=(B, 5, 6, 2)),
        "v3": rng.normal(size=(B, 4, 5, 3, 2)),
        "ids": np.array([[0, 1, 1, 6], [2, 2, 2, 0], [5, 1, 3, 3]], np.int32),
        "ids2": rng.integers(0, 5, size=(B, 2, 3)).astype(np.int32),
    }
    x["vec0"], x["l10"], x["ids0"] = x["vec"][0], x["l1"][0], x["ids2"][0, 0]
    return x


def _random_like(shapes, seed, dtype=np.float64):
    """Parameters of the given shapes (numpy random normal, scaled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(dtype), shapes)


# jit without XLA CPU backend optimisations: the test graphs compile several times faster.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def linen_zoo():
    with jax.enable_x64(True):
        model = LinenZoo()
        x = _zoo_inputs()
        params = _random_like(jax.eval_shape(model.init, jax.random.key(1), x)["params"], 1)
        out = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
        y = np.random.default_rng(2).normal(size=out.shape)
        loss = losses.squared_error()

        @_jit
        def run(params, x, y):
            cap = kfx.value_grads_and_stats(
                model, params, x, targets=y, loss=loss, with_outputs=True
            )
            ref_loss, ref_grads = jax.value_and_grad(
                lambda p: loss(model.apply({"params": p}, x), y)
            )(params)
            outputs, inter = model.apply(
                {"params": params}, x, capture_intermediates=True, mutable=["intermediates"]
            )
            return cap, ref_loss, ref_grads, outputs, inter["intermediates"]

        res = _np(run(params, x, y))
        metas = kfx.layer_metas(model, params, x)
    return dict(zip(("cap", "loss", "grads", "outputs", "inter"), res, strict=True)) | {
        "params": params,
        "metas": metas,
        "x": x,
    }


def test_linen_zoo_loss_grads_and_outputs_match_a_plain_forward(linen_zoo):
    cap = linen_zoo["cap"]
    assert cap.loss.dtype == np.float64
    _close(cap.loss, linen_zoo["loss"])
    _close(cap.aux["outputs"], linen_zoo["outputs"])
    _tree_close(cap.grads, linen_zoo["grads"])
    assert cap.aux["mutated"] == {}
    assert cap.sampled_grads is None and cap.sampled_targets is None
    assert getattr(cap, "stats_fn", None) is None  # a closure: not part of the jit output


def test_linen_zoo_captures_every_layer_and_metas_agree(linen_zoo):
    stats = linen_zoo["cap"].stats
    assert sorted(stats) == sorted(LINEN_NAMES)
    # layer_metas lists the layers in call order (a dict returned by jit is sorted by key).
    metas = linen_zoo["metas"]
    assert [m.name for m in metas] == LINEN_NAMES
    assert {m.name: m for m in metas} == {n: s.meta for n, s in stats.items()}
    kinds = {n: v[0] for n, v in {**LINEN_LAYERS, **LINEN_EXTRA}.items()}
    for name, s in stats.items():
        assert s.meta.name == name
        assert s.meta.kind == kinds[name]
        assert s.meta.num_calls == (2 if name == "shared" else 1)
        assert s.g_sampled is None
    # DenseGeneral: several input and output axes in the kernel matrix.
    assert stats["dg_multi"].meta.kernel_shape == (3, 4, 2, 3)
    assert stats["dg_multi"].meta.n_in_axes == 2
    assert stats["dg_reversed"].meta.kernel_shape == (3, 4, 5)  # Flax sorts the axes
    assert stats["dg_middle"].a.shape == (B, 3 * 4, 2)
    assert stats["dg_middle"].g.shape == (B, 3 * 4, 4)
    assert stats["c1_same_lower_batch_axes"].a.shape == (B * 2, 7, 2 * 2)
    assert stats["c1_int_indil_unbatched"].a.shape[0] == 1
    assert stats["emb"].a.shape == (B, 4)
    assert stats["shared"].a.shape == (B, 2, 4)


@pytest.mark.parametrize("name", LINEN_NAMES)
def test_linen_a_transpose_g_is_the_kernel_gradient(linen_zoo, name):
    s = linen_zoo["cap"].stats[name]
    _check_layer_grads(s, linen_zoo["grads"], linen_zoo["params"])
    has_bias = "bias" in linen_zoo["params"][name]
    assert s.meta.has_bias == has_bias
    if s.meta.kind == "embed":
        assert np.issubdtype(s.a.dtype, np.integer)


@pytest.mark.parametrize("name", LINEN_NAMES)
def test_linen_h_is_the_layer_output_and_a_reproduces_it(linen_zoo, name):
    s = linen_zoo["cap"].stats[name]
    calls = linen_zoo["inter"][name]["__call__"]
    assert len(calls) == s.meta.num_calls
    rows = s.a.shape[0]
    want = np.concatenate([np.asarray(h).reshape(rows, -1, s.meta.out_features) for h in calls], 1)
    _close(s.h, want, err_msg=name)
    _close(_stats_layer_output(s, linen_zoo["params"]), want, err_msg=name)


def test_linen_embed_ids_are_the_inputs(linen_zoo):
    stats = linen_zoo["cap"].stats
    x = linen_zoo["x"]
    np.testing.assert_array_equal(stats["emb"].a, np.asarray(x["ids"]))
    np.testing.assert_array_equal(stats["emb_axes"].a, np.asarray(x["ids2"]).reshape(B, 6))
    np.testing.assert_array_equal(stats["emb_unbatched"].a, np.asarray(x["ids0"]).reshape(1, 3))


# ---------------------------------------------------------------------------------------------
# Linen MLP: g, g_sampled and sampled_grads against a hand-written forward pass


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


def _mlp_manual(params, eps, x):
    """The MLP by hand with explicit zero probes ``eps`` on both pre-activations."""
    h1 = x @ params["hidden"]["kernel"] + params["hidden"]["bias"] + eps[0]
    a2 = jnp.tanh(h1)
    h2 = a2 @ params["out"]["kernel"] + params["out"]["bias"] + eps[1]
    return h2, (x, a2), (h1, h2)


def _mlp_problem(name, n, seed=0, dtype=np.float64):
    """Inputs, targets for loss ``name`` and parameters of :class:`MLP` (numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(dtype)
    if name == "softmax_cross_entropy":
        y = rng.integers(0, 3, size=(n,)).astype(np.int32)
    elif name == "sigmoid_cross_entropy":
        y = rng.integers(0, 2, size=(n, 3)).astype(dtype)
    else:
        y = rng.normal(size=(n, 3)).astype(dtype)
    shapes = jax.eval_shape(MLP().init, jax.random.key(0), x)["params"]
    return x, y, _random_like(shapes, seed + 1, dtype)


LOSS_NAMES = ["softmax_cross_entropy", "sigmoid_cross_entropy", "squared_error"]


@pytest.fixture(scope="module", params=LOSS_NAMES)
def mlp_sampled(request):
    name = request.param
    with jax.enable_x64(True):
        model, loss = MLP(), losses.as_loss(name)
        n = B + 1
        x, y, params = _mlp_problem(name, n)

        @_jit
        def run(params, rng):
            capture = functools.partial(
                kfx.value_grads_and_stats, model, params, x, targets=y, loss=loss, rng=rng
            )
            both = capture(sampled="both", with_outputs=True)
            only_g = capture(sampled="grads")
            only_cot = capture(sampled="cotangents")
            cotangent_only = kfx.layer_stats(model, params, x, targets=y, loss=loss)
            eps = (jnp.zeros((n, 5), jnp.float64), jnp.zeros((n, 3), jnp.float64))

            def manual_g(t):
                return jax.grad(lambda e: loss(_mlp_manual(params, e, x)[0], t))(eps)

            _, acts, outs = _mlp_manual(params, eps, x)
            t_s = both.sampled_targets
            ref = {
                "g": manual_g(y),
                "g_sampled": manual_g(t_s),
                "acts": acts,
                "outs": outs,
                "sampled_grads": jax.grad(lambda p: loss(model.apply({"params": p}, x), t_s))(
                    params
                ),
                "grads": jax.grad(lambda p: loss(model.apply({"params": p}, x), y))(params),
                "sample": loss.sample(rng, both.aux["outputs"]),
            }
            return both, only_g, only_cot, cotangent_only, ref

        res = _np(run(params, jax.random.key(6)))
    return (name,) + res


def test_g_and_g_sampled_equal_a_manual_vjp_with_the_sampled_targets(mlp_sampled):
    name, both, _, _, _, ref = mlp_sampled
    stats = both.stats
    assert list(stats) == ["hidden", "out"]
    for i, layer in enumerate(["hidden", "out"]):
        s = stats[layer]
        _close(s.a[:, 0], ref["acts"][i])
        _close(s.h[:, 0], ref["outs"][i])
        _close(s.g[:, 0], ref["g"][i])
        _close(s.g_sampled[:, 0], ref["g_sampled"][i])
    _tree_close(both.grads, ref["grads"])
    # The sampled targets are the loss's samples at the model outputs, valid for the loss.
    t_s = both.sampled_targets
    np.testing.assert_array_equal(t_s, ref["sample"])
    if name == "softmax_cross_entropy":
        assert t_s.shape == (B + 1,) and np.issubdtype(t_s.dtype, np.integer)
        assert ((t_s >= 0) & (t_s < 3)).all()
    elif name == "sigmoid_cross_entropy":
        assert t_s.shape == (B + 1, 3) and set(np.unique(t_s)) <= {0.0, 1.0}
    else:
        assert t_s.shape == (B + 1, 3) and t_s.dtype == np.float64


def test_sampled_grads_equal_jax_grad_on_the_sampled_targets(mlp_sampled):
    _, both, only_g, only_cot, _, ref = mlp_sampled
    _tree_close(both.sampled_grads, ref["sampled_grads"])
    # "grads": the gradient only; "cotangents": the statistics only; same samples for one rng.
    _tree_close(only_g.sampled_grads, ref["sampled_grads"])
    assert all(s.g_sampled is None for s in only_g.stats.values())
    assert only_cot.sampled_grads is None
    for layer in ("hidden", "out"):
        _close(only_cot.stats[layer].g_sampled, both.stats[layer].g_sampled)
    for c in (only_g, only_cot):
        np.testing.assert_array_equal(c.sampled_targets, both.sampled_targets)
        assert all(s.h is None for s in c.stats.values())


def test_layer_stats_equals_the_stats_of_value_grads_and_stats(mlp_sampled):
    _, both, _, _, cotangent_only, _ = mlp_sampled
    assert list(cotangent_only) == list(both.stats)
    for layer, s in cotangent_only.items():
        t = both.stats[layer]
        assert s.meta == t.meta
        assert s.g_sampled is None
        _close(s.a, t.a)
        _close(s.g, t.g)
        _close(s.h, t.h)


def test_sampled_needs_rng_and_a_valid_mode():
    x, y, params = _mlp_problem("softmax_cross_entropy", 2, dtype=np.float32)

    def capture(p, **kw):
        out = kfx.value_grads_and_stats(MLP(), p, x, targets=y, loss="softmax_cross_entropy", **kw)
        return out.loss

    with pytest.raises(ValueError, match="rng"):
        jax.eval_shape(functools.partial(capture, sampled="both"), params)
    with pytest.raises(ValueError, match="sampled must be one of"):
        jax.eval_shape(functools.partial(capture, sampled="yes"), params)


def test_successive_batch_sizes_under_jit():
    model, loss = MLP(), losses.softmax_cross_entropy()
    traces = []

    @_jit
    def run(p, x, y, rng):
        traces.append(x.shape[0])
        out = kfx.value_grads_and_stats(
            model, p, x, targets=y, loss=loss, rng=rng, sampled="cotangents"
        )
        grads = jax.grad(lambda p: loss(model.apply({"params": p}, x), y))(p)
        return out, grads

    for n in (4, 6, 4):
        x, y, params = _mlp_problem("softmax_cross_entropy", n, seed=n, dtype=np.float32)
        out, grads = _np(run(params, x, y, jax.random.key(2)))
        for s in out.stats.values():
            assert s.a.shape[0] == n and s.g.shape[0] == n and s.g_sampled.shape[0] == n
            np.testing.assert_allclose(
                _stats_kernel_grad(s), _leaf(grads, s.meta.kernel_path), rtol=1e-5, atol=1e-6
            )
    assert traces == [4, 6]  # one trace per batch size, the first reused


# ---------------------------------------------------------------------------------------------
# Linen: mutable collections and lifted transforms


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


def test_linen_batchnorm_returns_updated_batch_stats_and_exact_stats():
    model, loss = BNNet(), losses.squared_error()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    v = _random_like(jax.eval_shape(model.init, jax.random.key(2), x), 1, np.float32)
    params, extra = v["params"], {"batch_stats": v["batch_stats"]}

    @_jit
    def run(params, extra):
        out = kfx.value_grads_and_stats(
            model, params, x, targets=y, loss=loss, extra_variables=extra, mutable=["batch_stats"]
        )

        def ref_loss(p):
            o, mutated = model.apply({"params": p, **extra}, x, mutable=["batch_stats"])
            return loss(o, y), mutated

        (value, mutated), grads = jax.value_and_grad(ref_loss, has_aux=True)(params)
        return out, value, mutated, grads

    out, value, mutated, grads = _np(run(params, extra))
    kw = dict(rtol=1e-5, atol=1e-6)
    _close(out.loss, value, **kw)
    assert set(out.aux["mutated"]) == {"batch_stats"}
    _tree_close(out.aux["mutated"], mutated, **kw)
    assert not np.allclose(mutated["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    _tree_close(out.grads, grads, **kw)
    assert list(out.stats) == ["Dense_0", "Dense_1"]
    for s in out.stats.values():
        np.testing.assert_allclose(_stats_kernel_grad(s), _leaf(grads, s.meta.kernel_path), **kw)
        np.testing.assert_allclose(s.g.sum((0, 1)), _leaf(grads, s.meta.bias_path), **kw)
    # The cotangent-only pass and the metas need the mutable collection too.
    cot = jax.eval_shape(
        lambda p: kfx.layer_stats(
            model, p, x, targets=y, loss=loss, extra_variables=extra, mutable=["batch_stats"]
        ),
        params,
    )
    for name, s in cot.items():
        assert s.g.shape == out.stats[name].g.shape
    metas = kfx.layer_metas(model, params, x, extra_variables=extra, mutable=["batch_stats"])
    assert metas == tuple(s.meta for s in out.stats.values())


class _Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(4)(c)), None


def _scanned(**scan_kwargs):
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(_Block, length=3, **scan_kwargs)()(x, None)
            return nn.Dense(2)(x)

    return Scanned()


@pytest.mark.parametrize(
    "scan_kwargs",
    [
        dict(variable_axes={"params": 0}, split_rngs={"params": True}),
        dict(variable_broadcast="params", split_rngs={"params": False}),
        dict(variable_axes={True: 0}, split_rngs={"params": True}),
    ],
    ids=["stacked_params", "broadcast_params", "all_collections_stacked"],
)
def test_linen_scan_raises_instead_of_dropping_layers(scan_kwargs):
    model = _scanned(**scan_kwargs)
    x = jnp.ones((2, 4))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def capture(p):
        y = jnp.zeros((2, 2))
        return kfx.value_grads_and_stats(model, p, x, targets=y, loss="squared_error").loss

    with pytest.raises(ValueError, match=r"nn\.scan") as err:
        jax.eval_shape(capture, params)
    assert "unroll" in str(err.value)


# ---------------------------------------------------------------------------------------------
# NNX: every layer kind in one model


class NNXZoo(nnx.Module):
    def __init__(self, rngs):
        f = dict(param_dtype=jnp.float64, rngs=rngs)
        self.lin = nnx.Linear(4, 3, **f)
        self.lin_seq = nnx.Linear(4, 3, use_bias=False, **f)
        self.shared = nnx.Linear(4, 4, **f)
        self.c1_causal = nnx.Conv(2, 3, (3,), padding="CAUSAL", kernel_dilation=2, **f)
        self.c1_circular = nnx.Conv(2, 2, (3,), strides=2, padding="CIRCULAR", **f)
        self.c2_same = nnx.Conv(2, 3, (3, 3), strides=(2, 1), padding="SAME", **f)
        self.c2_pairs = nnx.Conv(
            2,
            2,
            (2, 3),
            padding=((1, 0), (2, 1)),
            kernel_dilation=(1, 2),
            input_dilation=(2, 1),
            use_bias=False,
            **f,
        )
        self.c3_valid = nnx.Conv(2, 2, (2, 2, 2), strides=(1, 2, 1), padding="VALID", **f)
        self.emb = nnx.Embed(7, 3, **f)

    INPUT_OF = {
        "lin": "vec",
        "lin_seq": "seq4",
        "c1_causal": "l1",
        "c1_circular": "l1b",
        "c2_same": "i2",
        "c2_pairs": "i2",
        "c3_valid": "v3",
        "emb": "ids",
    }

    def __call__(self, x):
        outs = [jnp.tanh(getattr(self, n)(x[k])).reshape(B, -1) for n, k in self.INPUT_OF.items()]
        outs.append(self.shared(jnp.tanh(self.shared(x["vec"]))))
        return jnp.concatenate(outs, axis=-1)


NNX_NAMES = sorted([*NNXZoo.INPUT_OF, "shared"])


def _nnx_model(make, seed):
    """An NNX model built abstractly (no eager initialisers) and filled with numpy values."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    state = _random_like(state, seed)
    return graphdef, state


@pytest.fixture(scope="module")
def nnx_zoo():
    with jax.enable_x64(True):
        graphdef, state = _nnx_model(lambda: NNXZoo(nnx.Rngs(0)), 3)
        x = _zoo_inputs()
        x["seq4"] = x["seq"]
        out = jax.eval_shape(lambda st: nnx.merge(graphdef, st)(x), state)
        y = np.random.default_rng(2).normal(size=out.shape)
        loss = losses.squared_error()

        structs = {}  # tree structures are static: recorded while tracing

        @_jit  # the functional NNX API (split/merge) under jax.jit; nnx.jit is tested below
        def run(state, x, y):
            model = nnx.merge(graphdef, state)
            cap = kfx.nnx_value_grads_and_stats(model, x, targets=y, loss=loss, with_outputs=True)
            ref_loss, ref_grads = nnx.value_and_grad(lambda m: loss(m(x), y))(model)
            direct = {n: getattr(model, n)(x[k]) for n, k in NNXZoo.INPUT_OF.items()}
            structs["grads"] = jax.tree.structure(cap.grads)
            structs["ref_grads"] = jax.tree.structure(ref_grads)
            structs["params"] = jax.tree.structure(nnx.state(model, nnx.Param))
            pure = cap._replace(grads=nnx.to_pure_dict(cap.grads), aux=None)
            return pure, ref_loss, nnx.to_pure_dict(ref_grads), direct

        cap, ref_loss, ref_grads, direct = _np(run(state, x, y))
        model = nnx.merge(graphdef, state)
        metas = kfx.nnx_layer_metas(model, x)
        res = {
            "cap": cap,
            "structs": structs,
            "grads": cap.grads,
            "ref_grads": ref_grads,
            "loss": ref_loss,
            "direct": direct,
            "params": _np(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            "metas": metas,
        }
    return res


def test_nnx_grads_have_the_param_state_structure_and_match_nnx_grad(nnx_zoo):
    structs = nnx_zoo["structs"]
    assert structs["grads"] == structs["params"] == structs["ref_grads"]
    _tree_close(nnx_zoo["grads"], nnx_zoo["ref_grads"])
    _close(nnx_zoo["cap"].loss, nnx_zoo["loss"])


def test_nnx_captures_every_layer_and_metas_agree(nnx_zoo):
    stats = nnx_zoo["cap"].stats
    assert sorted(stats) == NNX_NAMES
    metas = nnx_zoo["metas"]
    assert [m.name for m in metas] == [*NNXZoo.INPUT_OF, "shared"]  # call order
    assert {m.name: m for m in metas} == {n: s.meta for n, s in stats.items()}
    assert stats["shared"].meta.num_calls == 2
    assert stats["shared"].a.shape == (B, 2, 4)
    assert stats["c1_circular"].a.shape[0] == B * 2
    assert stats["emb"].meta.kind == "embed"
    assert {stats[n].meta.kind for n in NNX_NAMES if n.startswith("c")} == {"conv"}


@pytest.mark.parametrize("name", NNX_NAMES)
def test_nnx_a_transpose_g_is_the_kernel_gradient(nnx_zoo, name):
    s = nnx_zoo["cap"].stats[name]
    _check_layer_grads(s, nnx_zoo["ref_grads"], nnx_zoo["params"])
    assert s.meta.has_bias == ("bias" in nnx_zoo["params"][name])


@pytest.mark.parametrize("name", NNX_NAMES)
def test_nnx_h_is_the_layer_output_and_a_reproduces_it(nnx_zoo, name):
    s = nnx_zoo["cap"].stats[name]
    _close(_stats_layer_output(s, nnx_zoo["params"]), s.h, err_msg=name)
    if name in nnx_zoo["direct"]:
        _close(s.h, nnx_zoo["direct"][name].reshape(s.h.shape), err_msg=name)


# ---------------------------------------------------------------------------------------------
# NNX: mutable state, the optimizer, transforms


class NNXBNNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.bn(self.l1(x))))


def test_nnx_batchnorm_state_is_written_back_and_kfac_optimizer_steps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.integers(0, 3, size=(6,)).astype(np.int32)
    loss = losses.softmax_cross_entropy()
    graphdef, state = _nnx_model(lambda: NNXBNNet(nnx.Rngs(0)), 4)
    state = jax.tree.map(lambda v: v.astype(np.float32), state)
    model = nnx.merge(graphdef, state)
    ref = nnx.merge(graphdef, jax.tree.map(np.copy, state))  # independent variables
    bn_before = {n: np.copy(state["bn"][n][...]) for n in ("mean", "var")}
    opt = nnx.Optimizer(model, kfqn_jax.kfac(0.1, inverse_every=1), wrt=nnx.Param)
    structs = {}

    @nnx.jit
    def step(model, opt, ref, rng):
        ref_loss, ref_grads = nnx.value_and_grad(lambda m: loss(m(x), y))(ref)
        out = kfx.nnx_value_grads_and_stats(
            model, x, targets=y, loss=loss, rng=rng, sampled="cotangents"
        )
        structs["grads"] = jax.tree.structure(out.grads)
        structs["params"] = jax.tree.structure(nnx.state(model, nnx.Param))
        opt.update(model, out.grads, layer_stats=out.stats)
        return out, ref_loss, ref_grads

    before = _np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    out, ref_loss, ref_grads = step(model, opt, ref, jax.random.key(2))
    assert structs["grads"] == structs["params"]
    assert jax.tree.structure(out.grads) == jax.tree.structure(nnx.state(model, nnx.Param))
    kw = dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.loss, ref_loss, **kw)
    grads = _np(nnx.to_pure_dict(ref_grads))
    _tree_close(_np(nnx.to_pure_dict(out.grads)), grads, **kw)
    # BatchNorm statistics were updated in place, as by a plain training-mode call.
    for name in ("mean", "var"):
        new, want = getattr(model.bn, name)[...], getattr(ref.bn, name)[...]
        np.testing.assert_allclose(new, want, **kw)
        assert not np.allclose(new, bn_before[name])
    # The optimizer took a finite step on every parameter.
    after = _np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        assert np.isfinite(a).all() and not np.allclose(a, b)
    assert int(opt.step[...]) == 1
    for s in _np(out.stats).values():
        np.testing.assert_allclose(_stats_kernel_grad(s), _leaf(grads, s.meta.kernel_path), **kw)


class _NNXScanned(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(4, 4, rngs=rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return nnx.relu(layer(x))

        return self.head(body(x, self.layers))


class _NNXRemat(nnx.Module):
    def __init__(self, rngs):
        self.inner = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.remat(lambda m, x: nnx.relu(m(x)))(self.inner, x))


@pytest.mark.parametrize("cls", [_NNXScanned, _NNXRemat], ids=["scan", "remat"])
def test_nnx_layers_inside_transforms_raise_instead_of_being_dropped(cls):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))

    def capture(state):
        model = nnx.merge(graphdef, state)
        y = jnp.zeros((2, 2))
        return kfx.nnx_value_grads_and_stats(
            model, jnp.ones((2, 4)), targets=y, loss="squared_error"
        ).loss

    with pytest.raises(ValueError, match="transform") as err:
        jax.eval_shape(capture, state)
    assert "unroll" in str(err.value)


def test_nnx_layer_outside_the_model_is_passed_through():
    model_def, model_state = nnx.split(nnx.eval_shape(lambda: NNXBNNet(nnx.Rngs(0))))
    frozen_def, frozen_state = nnx.split(nnx.eval_shape(lambda: nnx.Linear(5, 3, rngs=nnx.Rngs(1))))

    def capture(model_state, frozen_state):
        model, frozen = nnx.merge(model_def, model_state), nnx.merge(frozen_def, frozen_state)
        return kfx.nnx_value_grads_and_stats(
            model,
            jnp.ones((4, 5)),
            targets=jnp.zeros((4, 3)),
            loss="squared_error",
            call=lambda m, x: m(frozen(x)),
        ).stats

    stats = jax.eval_shape(capture, model_state, frozen_state)
    assert list(stats) == ["l1", "l2"]


def test_stats_fn_keeps_exact_fisher_cotangents():
    """The lazy ``stats_fn`` gives the same statistics as the eager capture, ``g_exact``
    included, when both sampled-label and exact-Fisher cotangents are requested."""
    model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (5, 2))
    y = jnp.array([0, 2, 1, 1, 0])
    params = model.init(jax.random.key(1), x)["params"]
    loss = kfqn_jax.losses.softmax_cross_entropy()

    @jax.jit
    def run(params):
        out = kfx.value_grads_and_stats(
            model,
            params,
            x,
            targets=y,
            loss=loss,
            rng=jax.random.key(2),
            sampled="cotangents",
            exact_fisher=True,
        )
        return out.stats, out.stats_fn()

    eager, lazy = run(params)
    assert sorted(eager) == sorted(lazy)
    for name in eager:
        for field in ("a", "g", "g_sampled", "g_exact"):
            ref, got = getattr(eager[name], field), getattr(lazy[name], field)
            assert ref is not None and got is not None, (name, field)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_masked_conv_is_rejected_with_a_clear_error():
    x = jnp.ones((2, 6, 6, 3))
    mask = jnp.ones((3, 3, 3, 4)).at[2].set(0.0)
    model = nn.Conv(4, (3, 3), mask=mask)
    params = model.init(jax.random.key(0), x)["params"]
    loss = kfqn_jax.losses.squared_error()
    with pytest.raises(ValueError, match="mask.*not supported.*unmasked Conv"):
        kfx.value_grads_and_stats(model, params, x, targets=jnp.zeros((2, 6, 6, 4)), loss=loss)

    nmodel = nnx.Conv(3, 4, (3, 3), mask=mask, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mask.*not supported.*unmasked Conv"):
        kfx.nnx_value_grads_and_stats(nmodel, x, targets=jnp.zeros((2, 6, 6, 4)), loss=loss)
