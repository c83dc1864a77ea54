"""8-bit centroid tables (``kernels/centroid_fp8.py``) against 16-bit ones in the flat decode lookup, in one
run: the synthetic clustered layer of ``sqattn_index.bench`` (bf16 keys, 16 keys per fine cluster), one new
token, keep 10% by thresholds calibrated on the bf16 table (as the engine calibrates at build time) or by
budget; CUDA-graph timing with L2 flushed (``bench.Timer``), bf16 and fp8 timed in alternating rounds.

Per shape and context it prints: lookup and whole-step times of both tables, the speedup over the best dense
SDPA backend, the kept fraction, how many cluster decisions differ, the attention output's error against
dense attention in fp32 (both tables), and the sparse kernel alone against a device copy of the same bytes
(``--copy``). ``--sweep`` times the flat lookup's launch settings on the 8-bit table; ``--profile`` prints the
per-kernel profile of the 8-bit step.

    python benchmarks/gpu_fp8_centroids.py [--shapes llama3-8b,llama2-7b] [--contexts 32768,131072]
        [--rounds 3] [--sweep] [--profile] [--copy]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer, best_dense, copy_bandwidth, profile_step
    from sqattn_index.kernels import lookup as lk
    from sqattn_index.kernels.sparse_attention import sparse_attention_positions

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--modes", default="threshold,budget")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--copy", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; keep {a.keep}; flat decode lookup; {a.rounds} alternating "
        f"rounds of {a.reps} graph replays")
    for shape in a.shapes.split(","):
        for n in (int(c) for c in a.contexts.split(",")):
            # the same layer, queries and thresholds (calibrated on the bf16 table) for both tables
            layer, q, by_table = build(shape, n, a.keep, 1, dev, hierarchical=False)
            _, _, by_table8 = build(shape, n, a.keep, 1, dev, hierarchical=False, fp8=True, layer=layer)
            d = q.shape[-1]
            scale = d ** -0.5
            dense_ms, dense_name = best_dense(q, layer, timer, lambda m: None)
            exact = torch.nn.functional.scaled_dot_product_attention(
                q.float(), layer.keys.float().unsqueeze(0), layer.values.float().unsqueeze(0), enable_gqa=True)
            cent_mb = {t: layer.fine_centroids.numel() * (1 if t == "fp8" else 2) / 1e6 for t in ("bf16", "fp8")}
            log(f"\n{shape} {n}: dense {dense_name} {dense_ms:.4f} ms; fine table {cent_mb['bf16']:.1f} MB bf16, "
                f"{cent_mb['fp8']:.1f} MB fp8")
            for mode in a.modes.split(","):
                fns = {"bf16": by_table[mode], "fp8": by_table8[mode]}
                times = {(t, what): [] for t in fns for what in ("lookup", "step")}
                for _ in range(a.rounds):
                    for t, (step, lookup) in fns.items():
                        times[(t, "lookup")].append(timer(lookup))
                        times[(t, "step")].append(timer(step))
                med = {k: statistics.median(v) for k, v in times.items()}
                res = {}
                for t, (step, lookup) in fns.items():
                    keep, _, pos, total = lookup()
                    out = step()[0].float()  # (output, log-sum-exp)
                    err = float((out - exact).norm() / exact.norm())
                    res[t] = (keep, float(total.sum()) / (total.numel() * n), err, pos, total)
                diff = int((res["bf16"][0] != res["fp8"][0]).sum())
                for t in fns:
                    log(f"  {mode:9s} {t}: lookup {med[(t, 'lookup')]:.4f} ms, step {med[(t, 'step')]:.4f} ms "
                        f"({dense_ms / med[(t, 'step')]:.2f}x dense), kept {res[t][1]:.4f}, output rel err vs "
                        f"fp32 dense {res[t][2]:.4f}  [rounds: step "
                        + " ".join(f"{x:.4f}" for x in times[(t, 'step')]) + "]")
                log(f"  {mode:9s} fp8/bf16: lookup {med[('fp8', 'lookup')] / med[('bf16', 'lookup')]:.3f}, step "
                    f"{med[('fp8', 'step')] / med[('bf16', 'step')]:.3f}; cluster decisions differing {diff} of "
                    f"{res['fp8'][0].numel()}")
                if a.copy and mode == "threshold":
                    _, _, _, pos, total = res["fp8"]
                    kv_bytes = int(total.sum()) * d * 2 * 2
                    t_sparse = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total,
                                                                        scale))
                    achieved = kv_bytes / (t_sparse * 1e-3) / 1e9
                    same = copy_bandwidth(dev, timer, nbytes=kv_bytes, graph=True)
                    log(f"  sparse kernel alone {t_sparse:.4f} ms on {kv_bytes / 1e6:.1f} MB: {achieved:.0f} GB/s; "
                        f"copy of the same bytes {same:.0f} GB/s (read + written): {achieved / same:.2f} of it")
                if a.profile and mode == "threshold":
                    log(f"  per-kernel profile, fp8 {mode} step:")
                    profile_step(fns["fp8"][0], log)
                if a.sweep and mode == "threshold" and n == max(int(c) for c in a.contexts.split(",")):
                    default = dict(lk.TUNING_FP8)
                    lookup = fns["fp8"][1]
                    rows = []
                    for bc, w, tmax, progs in itertools.product((64, 128), (2, 4), (2, 4, 8), (512, 1024)):
                        lk.TUNING_FP8.update(flat_block_c=bc, flat_warps_one_query=w, flat_warps=w,
                                             flat_tiles_max=tmax, flat_programs=progs)
                        try:
                            rows.append((timer(lookup), bc, w, tmax, progs))
                        except Exception as exc:  # out of resources
                            log(f"    sweep {bc} {w} {tmax} {progs}: {type(exc).__name__}")
                    lk.TUNING_FP8.clear()
                    lk.TUNING_FP8.update(default)
                    rows.sort()
                    log("  fp8 lookup sweep at the last context (ms, block_c, warps, tiles_max, programs), best 6: "
                        + "; ".join(f"{r[0]:.4f} {r[1:]}" for r in rows[:6]))
            del layer, q, exact
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
