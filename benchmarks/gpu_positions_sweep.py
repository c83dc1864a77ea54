"""GPU timing of the launches after a flat decode lookup's normaliser, per launch setting of the positions
kernel (``positions.TUNING``: segments per program, which is also the block of ``decide.decide_from_logits``,
key columns per store step, warps): threshold mode (decisions + positions from the block sums) and budget mode
(positions from the budget search's prefix sums, the search itself not timed). Synthetic clustered layer of
``sqattn_index.bench``, one decode token at 128K, keep 10%, CUDA-graph timing with L2 flushed.

    python benchmarks/gpu_positions_sweep.py [--shapes llama2-7b,llama3-8b]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import BenchConfig, Timer, calibrate
    from sqattn_index.kernels import positions as ps
    from sqattn_index.kernels.budget import budget_mask_from_logits
    from sqattn_index.kernels.decide import decide_from_logits
    from sqattn_index.kernels.lookup import _Level

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, 30)
    default = dict(ps.TUNING)
    for shape in a.shapes.split(","):
        layer, q, _ = build(shape, a.context, 0.1, 1, dev, hierarchical=False)
        hk, n, d = layer.keys.shape
        qg = q.reshape(1, hk, -1, d)
        fthr, _ = calibrate(layer, qg, 0.1, BenchConfig(), d ** -0.5, False)
        level = _Level(qg, layer.fine_centroids, layer.fine_sizes, d ** -0.5, "ieee", spread=layer.fine_spread,
                       flat_fine=True)
        part, _, logits = level.lse(always=(layer.keys, layer.sink, layer.window))
        lows = ps.segment_lows(layer.fine_offsets, n, layer.window)
        cf = layer.fine_centroids.shape[1]
        seglen = torch.empty(1, hk, cf + 2, dtype=torch.int32, device=dev)
        excl = torch.empty_like(seglen)
        budget = torch.full((1, hk), 0.1 * n - layer.sink - layer.window, device=dev)
        budget_mask_from_logits(logits, part, None, layer.fine_sizes, budget, seglen=seglen, sink=layer.sink,
                                window=layer.window, excl=excl)
        budget_seglen = seglen.clone()
        results = []
        for bs, bk, w in itertools.product((128, 256, 512), (8, 16, 32), (2, 4, 8)):
            ps.TUNING.update(block_s=bs, block_k=bk, num_warps=w)
            blocksum = torch.empty(1, hk, -(-(cf + 2) // bs), dtype=torch.int32, device=dev)

            def threshold_pair():
                decide_from_logits(logits, part, fthr, layer.fine_sizes, seglen=seglen, blocksum=blocksum,
                                   sink=layer.sink, window=layer.window)
                return ps.kept_positions(seglen, lows, n, blocksum=blocksum)

            def budget_positions():
                return ps.kept_positions(budget_seglen, lows, n, excl=excl)

            t_thr, t_bud = timer(threshold_pair), timer(budget_positions)
            results.append((t_thr, t_bud, dict(ps.TUNING)))
            print(f"{shape} {ps.TUNING}: threshold decide + positions {t_thr * 1e3:6.2f} us, budget positions "
                  f"{t_bud * 1e3:6.2f} us", flush=True)
        ps.TUNING.update(default)
        for i, name in ((0, "threshold pair"), (1, "budget positions")):
            best = min(results, key=lambda r: r[i])
            base = next(r for r in results if r[2] == default)
            print(f"{shape} best {name}: {best[i] * 1e3:.2f} us with {best[2]} (default {base[i] * 1e3:.2f} us)",
                  flush=True)


if __name__ == "__main__":
    main()
