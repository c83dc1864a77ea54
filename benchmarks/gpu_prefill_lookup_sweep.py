"""GPU timing of the prefill lookup (512 question tokens at a 128K fixed context): the many-query path
(``kernels/lookup_many.py``, query-stationary normaliser, centroid-stationary probabilities, compacted fine
level) against the earlier grouped launches (``lookup.TUNING["many_path"] = "grouped"``), in one run.

Synthetic clustered layer of ``sqattn_index.bench`` (16 keys per fine cluster, 16 fine per coarse, coarse
slack 3), bf16, CUDA-graph timing with L2 flushed (``bench.Timer``). Per shape it prints: both paths' lookup
and whole-step (lookup + sparse attention) times in budget and threshold mode, how many fine clusters their
selections differ by, the per-kernel profile of the many-query lookup, a sweep of ``TUNING_MANY`` (the
normaliser's and the probability launch's tiles, warps, stages and splits, each varied with the other at
its default; the profile with the best of both) and, with --sparse, of the sparse prefill kernel at one split; the
last line per shape is the best setting as JSON.

    python benchmarks/gpu_prefill_lookup_sweep.py [--context 131072] [--shapes llama3-8b,llama2-7b] [--no-sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def build(shape: str, n: int, keep: float, tokens: int, dev: torch.device, hierarchical: bool = True,
          fp8: bool = False, layer=None):
    """(layer, q, closures by mode) for one shape: mode -> (step, lookup); ``hierarchical=False``: flat lookup;
    ``fp8``: the lookups score the layer's 8-bit centroid tables; ``layer``: that synthetic layer (from an
    earlier call with the same shape and n) instead of a new one."""
    from sqattn_index.bench import SHAPES, BenchConfig, calibrate, make_queries, squeezed_fns, synthetic_layer

    cfg = BenchConfig()
    hq, hk, d = SHAPES[shape]
    if layer is None:
        layer = synthetic_layer(hk, n, d, torch.bfloat16, dev, cfg, seed=n + hk)
    q = make_queries(layer, hq, tokens, seed=tokens)
    qg = q.reshape(1, hk, (hq // hk) * tokens, d)
    scale = d ** -0.5
    fthr, cthr = calibrate(layer, qg, keep, cfg, scale, hierarchical)
    fine_budget = torch.full((1, hk), max(keep * n - layer.sink - layer.window, 0.0), device=dev)
    budgets = (fine_budget, (fine_budget * cfg.coarse_slack).clamp(max=float(n)))
    fns = {"budget": squeezed_fns(layer, q, fthr, cthr, scale, "tf32", "full", budgets, hierarchical, fp8),
           "threshold": squeezed_fns(layer, q, fthr, cthr, scale, "tf32", "full", None, hierarchical, fp8)}
    return layer, q, fns


def main() -> None:
    from sqattn_index.bench import Timer
    from sqattn_index.bench import profile_step as profile
    from sqattn_index.kernels import lookup as lk
    from sqattn_index.kernels import lookup_many as lm
    from sqattn_index.kernels.sparse_attention import sparse_attention_positions

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--sparse", action="store_true", help="also sweep the sparse prefill kernel at one split")
    ap.add_argument("--budget", action="store_true", help="also sweep the budget launch's warp rule")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, {a.tokens} question tokens, keep {a.keep}")
    default = dict(lm.TUNING_MANY)
    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, a.tokens, dev)
        for mode, (step, lookup) in fns.items():
            res = {}
            for path in ("grouped", "stationary"):
                lk.TUNING["many_path"] = path
                keep = lookup()[0]
                res[path] = (timer(lookup), timer(step), keep)
            diff = int((res["grouped"][2] != res["stationary"][2]).sum())
            g, s = res["grouped"], res["stationary"]
            log(f"{shape} {mode}: lookup grouped {g[0]:.4f} ms, stationary {s[0]:.4f} ms ({g[0] / s[0]:.2f}x); "
                f"step grouped {g[1]:.4f} ms, stationary {s[1]:.4f} ms; kept clusters differing {diff} of "
                f"{s[2].numel()}")
        step, lookup = fns["budget"]
        log(f"{shape} budget: per-kernel profile of the many-query lookup")
        profile(lookup, log)
        if a.sweep:
            results = []
            norm = [dict(norm_block_q=bq, norm_block_c=bc, norm_warps=w, norm_stages=st, norm_splits=sp)
                    for (bq, bc, w, st), sp in itertools.product(
                        ((32, 64, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                         (64, 256, 8, 2)), (1, 2, 4))]
            prob = [dict(prob_block_q=bq, prob_block_c=bc, prob_warps=4, prob_stages=3, prob_programs=pp)
                    for bq, bc, pp in itertools.product((32, 64), (32, 64), (264, 528, 1056))]
            results = []
            for kind, over in [("norm", v) for v in norm] + [("prob", v) for v in prob]:
                lm.TUNING_MANY.clear()
                lm.TUNING_MANY.update(default, **over)
                try:
                    results.append((timer(lookup), kind, over))
                except Exception as exc:  # noqa: BLE001 - out of resources for this tile: report, go on
                    log(f"  sweep {over}: {type(exc).__name__}")
            lm.TUNING_MANY.clear()
            lm.TUNING_MANY.update(default)
            best = dict(default)
            for kind in ("norm", "prob"):
                mine = sorted((r for r in results if r[1] == kind), key=lambda r: r[0])
                for ms, _, over in mine[:5]:
                    log(f"  sweep {kind} {ms:.4f} ms {over}")
                best.update(mine[0][2])
            lm.TUNING_MANY.update(best)
            log(f"  lookup with both best: {timer(lookup):.4f} ms, step {timer(step):.4f} ms (default {default})")
            profile(lookup, log)
            lm.TUNING_MANY.clear()
            lm.TUNING_MANY.update(default)
            if a.budget:
                from sqattn_index.kernels import budget as budget_mod

                rule = dict(budget_mod.WARP_RULE)
                for over in ({}, dict(min_warps=1), dict(min_warps=2), dict(per_warp=1024, min_warps=1),
                             dict(per_warp=256, min_warps=1), dict(per_warp=1024, min_warps=4)):
                    budget_mod.WARP_RULE.update(rule, **over)
                    log(f"  budget warp rule {budget_mod.WARP_RULE}: lookup {timer(lookup):.4f} ms")
                budget_mod.WARP_RULE.update(rule)
            sparse = [(0.0, "not swept")]
            if a.sparse:
                _, _, pos, total = lookup()
                sparse = []
                for bm, bn, w, st in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)):
                    over = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
                    try:
                        ms = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total,
                                                                      q.shape[-1] ** -0.5, num_splits=1, config=over))
                        sparse.append((ms, over))
                    except Exception as exc:  # noqa: BLE001
                        log(f"  sparse {over}: {type(exc).__name__}")
                dflt = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total,
                                                                q.shape[-1] ** -0.5))
                log(f"  sparse prefill default {dflt:.4f} ms")
                for ms, over in sorted(sparse, key=lambda r: r[0])[:5]:
                    log(f"  sparse prefill splits=1 {ms:.4f} ms {over}")
            log(json.dumps({"shape": shape, "tuning_many": best, "sparse": min(sparse, key=lambda r: r[0])[1]}))
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
