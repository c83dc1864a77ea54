"""GPU timing of the squeezed decode step with a flat lookup, two ways, in one run: the positions path
(lookup launches + positions + split-K sparse kernel + split merge: ``centroid_lookup_positions`` +
``sparse_attention_positions``) against ``cluster_attention.flat_lookup_attention`` (normaliser launch,
[budget search,] attention over the kept segments with the decisions in the kernel, split merge), on the
synthetic clustered layer of ``sqattn_index.bench`` (CUDA-graph timing, L2 flushed, ``bench.Timer``),
against the best dense SDPA backend on the whole context.

It checks that both give the same output, times both in threshold and budget mode, times the attention
launches alone on the same kept keys (positions: the sparse kernel + merge over the given positions;
segments: ``cluster_attention`` over the given kept lengths), and with --sweep times launch settings of
``cluster_attention.TUNING`` in threshold mode (first shape).

    python benchmarks/gpu_cluster_attention.py [--shapes llama3-8b,llama2-7b] [--context 131072] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import BenchConfig, Timer, best_dense, calibrate, copy_bandwidth, profile_step
    from sqattn_index.kernels import cluster_attention as ca
    from sqattn_index.kernels.positions import segment_lows
    from sqattn_index.kernels.sparse_attention import sparse_attention_positions

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (--shapes tiny)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    copy = copy_bandwidth(dev, timer)
    log(f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; copy {copy:.0f} GB/s (read + write); context {a.context}, "
        f"one new token, keep {a.keep}; cluster_attention.TUNING {ca.TUNING}")
    for si, shape in enumerate(a.shapes.split(",")):
        layer, q, fns = build(shape, a.context, a.keep, 1, dev, hierarchical=False)
        hk, n, d = layer.keys.shape
        scale = d ** -0.5
        dense_ms, dense_name = best_dense(q, layer, timer, log)
        lows = segment_lows(layer.fine_offsets, n, layer.window)
        fthr, _ = calibrate(layer, q.reshape(1, hk, -1, d), a.keep, BenchConfig(), scale, False)  # as build()
        budget = torch.full((1, hk), max(a.keep * n - layer.sink - layer.window, 0.0), device=dev)
        for mode in ("threshold", "budget"):
            step, lookup = fns[mode]
            keep, _, pos, total = lookup()
            kv_bytes = int(total.sum()) * 2 * d * layer.keys.element_size()
            sel = dict(fine_threshold=fthr) if mode == "threshold" else dict(budget=budget)

            def new(config=None, sel=sel):
                return ca.flat_lookup_attention(q, layer.keys, layer.values, layer.fine_centroids, layer.fine_sizes,
                                                lows, scale, sink_tokens=layer.sink, window_tokens=layer.window,
                                                fine_spread=layer.fine_spread,
                                                always_keys=(layer.keys, layer.sink, layer.window), config=config,
                                                **sel)

            out_old, _ = step()
            out_new, _ = new()
            err = float((out_new.double() - out_old.double()).norm() / out_old.double().norm())
            old_ms, new_ms = timer(step), timer(new)
            log(f"{shape} {mode}: kept {int(total.sum()) / (hk * n):.4f}; dense {dense_name} {dense_ms:.4f} ms; "
                f"positions path {old_ms:.4f} ms ({dense_ms / old_ms:.2f}x); segments path {new_ms:.4f} ms "
                f"({dense_ms / new_ms:.2f}x); outputs differ by rel RMS {err:.2e}")
            seglen = torch.cat([torch.full((1, hk, 1), layer.sink, device=dev),
                                torch.where(keep, layer.fine_sizes.unsqueeze(0), 0),
                                torch.full((1, hk, 1), layer.window, device=dev)], dim=2).to(torch.int32)
            pos_ms = timer(lambda: sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale))
            seg_ms = timer(lambda: ca.cluster_attention(q, layer.keys, layer.values, lows, scale, seglen=seglen))
            for name, ms in (("sparse kernel + merge over positions", pos_ms),
                             ("cluster_attention + merge over kept lengths", seg_ms)):
                gbs = kv_bytes / (ms * 1e6)
                log(f"    {name}: {ms:.4f} ms, {gbs:.0f} GB/s of K/V ({gbs / max(copy, 1e-9):.0%} of copy)")
            if a.profile:
                profile_step(new, log)
            if a.sweep and mode == "threshold" and si == 0:
                grid = itertools.product((32, 64, 128), (1, 2, 4, 8), ((64, 2, 4), (32, 3, 4), (64, 3, 4), (32, 2, 2)))
                res = []
                for chunk, progs, (bn, st, nw) in grid:
                    over = dict(chunk=chunk, programs=progs, block_n=bn, num_stages=st, num_warps=nw)
                    res.append((timer(lambda over=over: new(over)), over))
                for ms, over in sorted(res, key=lambda r: r[0])[:12]:
                    log(f"    sweep {ms:.4f} ms {over}")
        del layer, q, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
