"""The benchmark runner end to end, in-process, on a tiny problem for a few steps."""

import json
import math

import pytest

from benchmarks import optimizers as opt_lib
from benchmarks import problems as prob_lib
from benchmarks import run

TOP_KEYS = {
    "schema_version",
    "problem",
    "config",
    "env",
    "data",
    "params_bytes",
    "param_count",
    "optimizers",
}
RUN_KEYS = {
    "status",
    "hparams",
    "steps",
    "losses",
    "step_times_s",
    "compile_time_s",
    "median_step_time_s",
    "step_time_ratio_to_adam",
    "final_loss",
    "final_test_loss",
    "opt_state_bytes",
    "params_bytes",
    "peak_memory_bytes",
    "epochs",
}


def _run(tmp_path, capsys, optimizers, steps=4, extra=()):
    argv = ["--problem", "tiny_ae", "--optimizers", optimizers, "--steps", str(steps)]
    rc = run.main([*argv, "--out", str(tmp_path), *extra])
    printed = capsys.readouterr().out
    with open(tmp_path / "tiny_ae.json") as f:
        result = json.load(f)
    return rc, result, printed


def test_adam_smoke_writes_json_plots_and_table(tmp_path, capsys):
    rc, result, printed = _run(tmp_path, capsys, "adam,tnt")
    assert rc == 0
    assert TOP_KEYS <= set(result)
    assert result["problem"] == "tiny_ae"
    assert result["config"]["steps"] == 4
    adam = result["optimizers"]["adam"]
    assert RUN_KEYS <= set(adam)
    assert adam["status"] == "ok"
    assert adam["steps"] == 4 and len(adam["losses"]) == 4
    assert len(adam["step_times_s"]) == 3  # the first call is compile_time_s
    assert all(math.isfinite(x) for x in adam["losses"])
    assert adam["losses"][-1] < adam["losses"][0]
    assert adam["compile_time_s"] > 0 and adam["median_step_time_s"] > 0
    assert adam["step_time_ratio_to_adam"] == pytest.approx(1.0)
    # Adam keeps two moments: about twice the parameter bytes.
    assert adam["opt_state_bytes"] >= 2 * result["params_bytes"]
    assert adam["hparams"]["learning_rate"] == pytest.approx(1e-3)
    assert adam["epochs"] and adam["epochs"][-1]["test_loss"] > 0
    # An optimizer that is not written yet is reported, not skipped.
    tnt = result["optimizers"]["tnt"]
    if not hasattr(__import__("kfqn_jax"), "tnt"):
        assert tnt["status"] == "not implemented"
    assert "tnt" in printed and "adam" in printed and "x adam" in printed
    for path in result["plots"]:
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 0


def test_same_initial_params_and_batches_across_optimizers(tmp_path, capsys):
    _, result, _ = _run(tmp_path, capsys, "adam,sgd", steps=3, extra=["--no-plots"])
    adam, sgd = result["optimizers"]["adam"], result["optimizers"]["sgd"]
    # Step 0's loss is evaluated at the shared initial parameters on the shared first batch.
    assert adam["losses"][0] == pytest.approx(sgd["losses"][0], rel=1e-6)
    assert "plots" not in result


def test_hparam_override_and_bad_names(tmp_path, capsys):
    rc, result, _ = _run(
        tmp_path, capsys, "adam", steps=2, extra=["--no-plots", "--hp", "adam.learning_rate=0.01"]
    )
    assert rc == 0
    assert result["optimizers"]["adam"]["hparams"]["learning_rate"] == 0.01
    with pytest.raises(SystemExit):
        run.parse_args(["--optimizers", "adam,nonsense"])
    with pytest.raises(SystemExit):
        run.parse_args(["--hp", "learning_rate=1"])


def test_time_budget_stops_each_optimizer_early(tmp_path, capsys):
    # A budget far below one step: each optimizer stops after its first timed step (step 2),
    # records why, and still evaluates the test loss at the point where it stopped.
    rc, result, _ = _run(
        tmp_path, capsys, "adam,sgd", steps=50, extra=["--no-plots", "--time-budget", "1e-9"]
    )
    assert rc == 0
    assert result["config"]["time_budget_s"] == 1e-9
    for rec in result["optimizers"].values():
        assert rec["stopped_by_time_budget"] is True
        assert rec["steps"] == 2 and len(rec["step_times_s"]) == 1
        assert rec["epochs"][-1]["step"] == 2 and rec["epochs"][-1]["test_loss"] > 0
    with pytest.raises(SystemExit):
        run.parse_args(["--time-budget", "0"])


def test_schedule_is_a_fresh_permutation_per_epoch():
    sched = run._schedule(10, 3, 7, seed=0)
    assert len(sched) == 7 and all(len(b) == 3 for b in sched)
    first_epoch = sorted(int(i) for b in sched[:3] for i in b)
    assert len(set(first_epoch)) == 9  # no repeats inside an epoch, the remainder dropped
    assert [b.tolist() for b in sched] == [b.tolist() for b in run._schedule(10, 3, 7, seed=0)]


def test_problem_zoo_shapes():
    import jax

    for name, out_dim in (("mnist_ae", 784), ("mnist_mlp", 10)):
        p = prob_lib.make_problem(name, quick=True)
        params = jax.eval_shape(p.init_params, jax.random.key(0))
        out = jax.eval_shape(lambda prm, p=p: p.model.apply({"params": prm}, p.x_train[:2]), params)
        assert out.shape == (2, out_dim)
    p = prob_lib.make_problem("mnist_ae", quick=True)
    params = jax.eval_shape(p.init_params, jax.random.key(0))
    kernels = [leaf.shape for leaf in jax.tree.leaves(params)]
    assert (784, 1000) in kernels and (250, 30) in kernels and (1000, 784) in kernels
    assert p.batch_size == 250 and p.x_train.shape == (5000, 784)


def test_char_lstm_named_block_partitions():
    import jax

    from kfqn_jax._src import base, ggn

    p = prob_lib.make_problem("char_lstm", quick=True)
    params = jax.eval_shape(p.init_params, jax.random.key(0))
    out = jax.eval_shape(lambda prm: p.model.apply({"params": prm}, p.x_train[:2]), params)
    assert out.shape == (2, 32, 256)
    stack = ggn.block_masks(params, opt_lib._NAMED_BLOCKS["lstm_stack"])
    layers = ggn.block_masks(params, opt_lib._NAMED_BLOCKS["lstm_layers"])
    gates = ggn.block_masks(params, opt_lib._NAMED_BLOCKS["lstm_gates"])
    assert sorted(stack.labels) == ["Dense_0", "LSTMCell_0", "LSTMCell_1"]
    assert sorted(layers.labels) == ["Dense_0", "Embed_0", "LSTMCell_0", "LSTMCell_1"]
    assert gates.num_blocks == 2 * 4 + 2  # four gates per LSTM layer, embedding, output
    # The embedding shares the first LSTM layer's block.
    paths = [tuple(map(str, q)) for q in base.tree_paths(params)]
    emb = paths.index(("Embed_0", "embedding"))
    first = [j for j, q in enumerate(paths) if q[0] == "LSTMCell_0"]
    assert all(stack.index[j] == stack.index[emb] for j in first)
    assert p.paper_settings["block_hessian_free"]["blocks"] == "lstm_stack"
    # Both methods were tuned on the same grid and compared with the same CG cap, curvature
    # batch and damping floor (benchmarks/RESULTS.md).
    hf, bd = p.paper_settings["hessian_free"], p.paper_settings["block_hessian_free"]
    for key in ("max_cg_iters", "curvature_fraction", "min_damping", "damping"):
        assert hf[key] == bd[key], key
    runner = opt_lib.build("block_hessian_free", p, {})
    assert runner.hparams["curvature_fraction"] == bd["curvature_fraction"]


def test_char_lstm_wide_is_char_lstm_with_128_units():
    import jax

    narrow = prob_lib.make_problem("char_lstm", quick=True)
    wide = prob_lib.make_problem("char_lstm_wide", quick=True)
    assert wide.name == "char_lstm_wide"
    params = jax.eval_shape(wide.init_params, jax.random.key(0))
    assert params["LSTMCell_1"]["hi"]["kernel"].shape == (128, 128)
    assert params["Dense_0"]["kernel"].shape == (128, 256)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 255_232
    # Same data, same (not re-tuned) optimizer settings.
    assert wide.paper_settings == narrow.paper_settings
    assert (wide.x_train == narrow.x_train).all() and (wide.y_test == narrow.y_test).all()


def test_cnn_2c2d_shapes():
    import jax
    import jax.numpy as jnp

    model = prob_lib.CNN2c2d(10)
    x = jnp.zeros((2, 28, 28, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert params["Conv_0"]["kernel"].shape == (5, 5, 1, 32)
    assert params["Conv_1"]["kernel"].shape == (5, 5, 32, 64)
    assert params["Dense_0"]["kernel"].shape == (7 * 7 * 64, 1024)
    assert jax.eval_shape(model.apply, {"params": params}, x).shape == (2, 10)


def test_kfac_smoke(tmp_path, capsys):
    import kfqn_jax

    if not hasattr(kfqn_jax, "kfac"):
        pytest.skip("kfqn_jax.kfac is not implemented yet")
    rc, result, _ = _run(tmp_path, capsys, "adam,kfac", steps=3, extra=["--no-plots"])
    kfac = result["optimizers"]["kfac"]
    assert rc == 0, kfac.get("reason")
    assert kfac["status"] == "ok" and len(kfac["losses"]) == 3
    # The paper settings match the factory's signature (no silently dropped hyperparameter).
    assert "ignored_hparams" not in kfac, kfac.get("ignored_hparams")
    assert all(math.isfinite(x) for x in kfac["losses"])
    assert kfac["step_time_ratio_to_adam"] > 0
    assert "kfac" in opt_lib.BUILDERS
