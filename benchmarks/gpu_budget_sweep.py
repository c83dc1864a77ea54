"""GPU timing of the decode lookup's budget launch (``budget.budget_mask_from_logits``) alone, per warps per
program and search slack, on the flat fine level of the synthetic clustered layer of ``sqattn_index.bench``
(one decode token, keep 0.1, CUDA-graph timing with L2 flushed, ``bench.Timer``).

The flat level's logits and partial normalisers are computed once; then each setting times the budget launch
and reports the kept keys over the target (slack > 0 lets the search stop once it keeps at most
(1 + slack) x target). ``iters=1`` (one search round) is the launch's floor without the search. Last, the
whole flat lookup (positions included) with slack 0 and each slack.

    python benchmarks/gpu_budget_sweep.py [--context 131072] [--shapes llama2-7b,llama3-8b]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_flat_lookup_sweep import DecodeCase  # this folder: scripts run as python benchmarks/...
    from sqattn_index.bench import Timer
    from sqattn_index.kernels import budget as bm

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b")
    ap.add_argument("--slacks", default="0,0.00390625,0.015625,0.0625")
    args = ap.parse_args()
    slacks = [float(s) for s in args.slacks.split(",")]
    dev = torch.device("cuda")
    timer = Timer(dev, 30)
    for shape in args.shapes.split(","):
        case = DecodeCase(shape, args.context, args.keep, dev)
        layer, n, hk, budget = case.layer, case.n, case.hk, case.budget
        part, _, logits = case.lse_only()
        c = layer.fine_centroids.shape[1]
        seglen = torch.empty(1, hk, c + 2, dtype=torch.int32, device=dev)
        excl = torch.empty_like(seglen)

        def run(slack, iters=32):
            return bm.budget_mask_from_logits(logits, part, None, layer.fine_sizes, budget, iters, seglen=seglen,
                                              sink=layer.sink, window=layer.window, excl=excl, slack=slack)

        for warps in (4, 8, 16, 32):
            bm.WARPS = warps
            for slack in slacks:
                keep, _ = run(slack)
                kept = (keep * layer.fine_sizes.unsqueeze(0)).sum(-1).float() / budget
                print(f"{shape} N={n} C={c} budget launch warps={warps:2d} slack={slack:.4f}: "
                      f"{timer(lambda: run(slack)) * 1e3:6.1f} us; kept/target mean {kept.mean():.4f} "
                      f"max {kept.max():.4f}", flush=True)
            print(f"{shape} N={n} budget launch warps={warps:2d} one search round (floor): "
                  f"{timer(lambda: run(0.0, iters=1)) * 1e3:6.1f} us", flush=True)
        bm.WARPS = None
        for slack in slacks:
            ms = timer(lambda: case.flat(slack))
            print(f"{shape} N={n} whole flat budget lookup (default warps) slack={slack:.4f}: {ms * 1e3:6.1f} us",
                  flush=True)
        del layer, case, part, logits
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
