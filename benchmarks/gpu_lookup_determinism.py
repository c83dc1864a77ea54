"""Run-to-run determinism of the Triton lookup on the GPU: the same inputs 30 times, every output compared
bitwise with the first run (threshold and budget mode, decode and prefill query counts, with and without
the estimate terms).

    python benchmarks/gpu_lookup_determinism.py [--context 131072]
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from sqattn_index.bench import BenchConfig, calibrate, estimate_kwargs, make_queries, synthetic_layer
    from sqattn_index.kernels.lookup import _run
    from sqattn_index.kernels.positions import kept_positions, segment_lows

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = BenchConfig()
    hk, hq, d, n = 8, 32, 128, args.context
    layer = synthetic_layer(hk, n, d, torch.bfloat16, dev, cfg, seed=3)
    scale = d ** -0.5
    lows = segment_lows(layer.fine_offsets, n, layer.window)
    for t in (1, 16, 64):
        q = make_queries(layer, hq, t, seed=t)
        qg = q.reshape(1, hk, (hq // hk) * t, d)
        for estimate in ("full", "plain"):
            cfg.estimate = estimate
            fthr, cthr = calibrate(layer, qg, 0.1, cfg, scale)
            kw = estimate_kwargs(layer, qg, scale, estimate)
            fine_budget = torch.full((1, hk), 0.1 * n - layer.sink - layer.window, device=dev)
            for mode in ("threshold", "budget"):
                sel = (fthr, cthr, None, None) if mode == "threshold" else (None, None, fine_budget, 3 * fine_budget)
                outs = []
                for _ in range(args.runs):
                    seglen = torch.empty(1, hk, layer.fine_centroids.shape[1] + 2, dtype=torch.int32, device=dev)
                    keep, allowed, probs, cprobs = _run(
                        qg, layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
                        layer.coarse_offsets, *sel, scale, True, "tf32" if t > 16 else "ieee", seglen=seglen,
                        sink=layer.sink, window=layer.window, **kw)
                    pos, total, _ = kept_positions(seglen, lows, n, allowed=allowed,
                                                   num_coarse=layer.coarse_centroids.shape[1])
                    outs.append(dict(keep=keep.clone(), allowed=allowed.clone(), probs=probs.clone(),
                                     coarse_probs=cprobs.clone(), seglen=seglen.clone(), total=total.clone()))
                torch.cuda.synchronize()
                diffs = {k: sum(int((o[k] != outs[0][k]).sum()) > 0 for o in outs[1:]) for k in outs[0]}
                print(f"T={t:3d} G*T={qg.shape[2]:4d} estimate={estimate:5s} {mode:9s}: runs differing from run 1 "
                      + ", ".join(f"{k} {v}" for k, v in diffs.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
