"""Cost of GGN-vector products and of one CG iteration of (block-diagonal) Hessian-free.

    python -m benchmarks.hf_cost --problem mnist_ae --quick --batch 1000

* ``ggn_ratio``: time of one GGN-vector product ``J^T H J v`` (with the model linearized once,
  as inside the optimizer) over one gradient evaluation (``jax.value_and_grad`` of the loss),
  same batch. Measured as the slope over ``n`` products in one jitted ``fori_loop``.
* ``curvature_ggn_product_ms`` / ``curvature_block_ggn_product_ms``: the same slope for the
  whole and the block-diagonal GGN product on the curvature batch (the first
  ``--curvature-fraction`` of the batch), i.e. the products of one HF and one BDHF CG
  iteration; BDHF blocks from ``--blocks`` or the problem's settings.
* ``*_per_cg_iter_ms``: the slope of a full optimizer update's time in the number of CG
  iterations (``progress_tol=0``, no backtracking, no line search), i.e. the marginal cost of
  a CG iteration of ``hessian_free`` and ``block_hessian_free``.
Medians of repeated timings; compilation excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _median_time(fn, *args, reps=5):
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    import jax
    import jax.numpy as jnp
    import optax

    import kfqn_jax
    from benchmarks import optimizers as opt_lib
    from benchmarks import problems as prob_lib
    from kfqn_jax._src import ggn

    p = argparse.ArgumentParser()
    p.add_argument("--problem", default="mnist_ae")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--curvature-fraction", type=float, default=0.25)
    p.add_argument("--blocks", default=None)
    args = p.parse_args(argv)
    prob = prob_lib.make_problem(args.problem, quick=args.quick)
    params = prob.init_params(jax.random.key(0))
    x = jnp.asarray(prob.x_train[: args.batch])
    y = None if prob.y_train is None else jnp.asarray(prob.y_train[: args.batch])
    t = prob.targets_of(x, y)

    def loss_fn(p_, xx=x):
        return prob.loss(prob.model.apply({"params": p_}, xx), t)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    t_grad = _median_time(grad_fn, params)

    v = jax.tree.map(lambda a: jnp.ones_like(a) * 1e-3, params)

    def product_slope(matvec_at):
        """Seconds per product (slope between 1 and 11 products after one linearization) and
        the time of the linearization plus one product; ``matvec_at(params) -> matvec``."""

        def products(p_, v_, n):
            matvec = matvec_at(p_)
            return jax.lax.fori_loop(0, n, lambda i, u: matvec(u), v_)

        f1 = jax.jit(lambda p_, v_: products(p_, v_, 1))
        f11 = jax.jit(lambda p_, v_: products(p_, v_, 11))
        t1, t11 = _median_time(f1, params, v), _median_time(f11, params, v)
        return (t11 - t1) / 10, t1

    def apply_on(xx):
        return lambda q: prob.model.apply({"params": q}, xx)

    t_gvp, t1 = product_slope(lambda p_: ggn.linearize_ggn(apply_on(x), prob.loss, p_)[1])
    out = {
        "problem": args.problem,
        "batch": args.batch,
        "grad_ms": 1e3 * t_grad,
        "ggn_product_ms": 1e3 * t_gvp,
        "linearize_plus_one_product_ms": 1e3 * t1,
        "ggn_ratio": t_gvp / t_grad,
    }

    n_curv = max(1, int(round(args.batch * args.curvature_fraction)))
    xc = x[:n_curv]
    grads = grad_fn(params)[1]
    blocks = args.blocks or prob.paper_settings.get("block_hessian_free", {}).get("blocks")
    blocks = opt_lib._NAMED_BLOCKS.get(blocks, blocks) if blocks else "layer"
    bm = ggn.block_masks(params, blocks)
    # Products on the curvature batch, as inside the optimizers: the whole GGN (one HF CG
    # iteration's product) and the block-diagonal one (one BDHF CG iteration's products).
    t_full, _ = product_slope(lambda p_: ggn.linearize_ggn(apply_on(xc), prob.loss, p_)[1])
    t_block, _ = product_slope(
        lambda p_: ggn.linearize_block_ggn(apply_on(xc), prob.loss, p_, bm).matvec
    )
    out["curvature_ggn_product_ms"] = 1e3 * t_full
    out["curvature_block_ggn_product_ms"] = 1e3 * t_block
    for name in ("hessian_free", "block_hessian_free"):
        kw = {"blocks": blocks} if name == "block_hessian_free" else {}
        times = {}
        for m in (5, 25):
            tx = getattr(kfqn_jax, name)(
                damping=1.0,
                max_cg_iters=m,
                progress_tol=0.0,
                backtracking=False,
                line_search=False,
                **kw,
            )
            state = tx.init(params)

            def upd(g, s, p_, tx=tx):
                return tx.update(
                    g,
                    s,
                    p_,
                    model_fn=lambda q: prob.model.apply({"params": q}, xc),
                    output_loss=prob.loss,
                    loss_fn=loss_fn,
                )

            fn = jax.jit(upd)
            times[m] = _median_time(fn, grads, state, params, reps=3)
            # every block stops at pAp <= 0 only; check the cap was reached
            out[f"{name}_cg_iters_at_cap_{m}"] = int(fn(grads, state, params)[1][0].cg_iters)
        out[f"{name}_per_cg_iter_ms"] = 1e3 * (times[25] - times[5]) / 20
        out[f"{name}_update_ms_at_25_iters"] = 1e3 * times[25]
    out["bdhf_num_blocks"] = bm.num_blocks
    out["curvature_batch"] = n_curv
    out["jax"] = jax.__version__
    out["device"] = str(jax.devices()[0])
    print(json.dumps(out, indent=1))
    del optax
    return out


if __name__ == "__main__":
    main()
