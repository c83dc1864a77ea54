"""GPU check of the budget search at many clusters per head (512K context: 32K fine clusters): the
in-register search (``budget.MAX_CLUSTERS`` = --max) against the exact sorted fallback (what ran past
16K clusters before session 9), in one run. Flat decode lookup, keep 0.1, the synthetic clustered layer of
``sqattn_index.bench`` (CUDA-graph timing, L2 flushed, ``bench.Timer``). Prints the lookup and step times both
ways and how many keep decisions differ.

    python benchmarks/gpu_budget_large.py [--shapes llama3-8b,llama2-7b] [--context 524288] [--max 32768] \\
        [--warps 8,16,32]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.kernels import budget as bm

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=524288)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--max", type=int, default=32768, help="MAX_CLUSTERS for the in-register search")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warps", default="", help="also time the in-register search at these warps (comma list)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    default = bm.MAX_CLUSTERS
    fallback = 0  # every head takes the exact sorted fallback: the reference of this check
    print(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, one new token, keep {a.keep}, flat",
          flush=True)
    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, 1, dev, hierarchical=False)
        step, lookup = fns["budget"]
        res = {}
        for cap in (fallback, a.max, fallback, a.max):  # interleaved
            bm.MAX_CLUSTERS = cap
            keep, _, _, total = lookup()
            res.setdefault(cap, []).append((timer(lookup), timer(step), keep.clone(), total.clone()))
        bm.MAX_CLUSTERS = default
        ref_keep, ref_total = res[fallback][0][2], res[fallback][0][3]
        for cap, runs in res.items():
            lk = min(r[0] for r in runs)
            st = min(r[1] for r in runs)
            diff = int((runs[0][2] != ref_keep).sum())
            print(f"{shape} MAX_CLUSTERS={cap}{' (sorted fallback)' if cap == fallback else ''}: lookup "
                  f"{lk:.4f} ms, step {st:.4f} ms; kept {int(runs[0][3].sum())} keys (fallback {int(ref_total.sum())}),"
                  f" {diff} of {ref_keep.numel()} cluster decisions differ from the fallback", flush=True)
        bm.MAX_CLUSTERS = a.max
        for w in [int(x) for x in a.warps.split(",") if x]:
            bm.WARPS = w
            keep, _, _, _ = lookup()
            diff = int((keep != ref_keep).sum())
            print(f"{shape} MAX_CLUSTERS={a.max} WARPS={w}: lookup {timer(lookup):.4f} ms, step {timer(step):.4f} ms; "
                  f"{diff} cluster decisions differ from the fallback", flush=True)
        bm.WARPS, bm.MAX_CLUSTERS = None, default
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
