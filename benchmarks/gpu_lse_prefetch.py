"""The flat decode normaliser's centroid prefetch (``lookup.TUNING["flat_prefetch"]``: block i + 1 loads
while block i is scored) on and off, with its launch settings, in one run: lookup alone and whole decode step
of the synthetic layer of ``sqattn_index.bench`` (threshold, keep 10%), CUDA-graph timing with L2 flushed
(``bench.Timer``), settings in alternating rounds.

    python benchmarks/gpu_lse_prefetch.py [--shapes llama3-8b,llama2-7b] [--context 131072] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.kernels import lookup as lk

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warps", default="2,4,8", help="flat_warps (several queries) / flat_warps_one_query")
    ap.add_argument("--programs", default="512,1024")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    default = dict(lk.TUNING)
    for shape in a.shapes.split(","):
        _, q, fns = build(shape, a.context, a.keep, 1, dev, hierarchical=False)
        step, lookup = fns["threshold"]
        one = shape == "llama2-7b"  # one query row per KV head (32 query and 32 KV heads)
        key = "flat_warps_one_query" if one else "flat_warps"
        settings = [dict(flat_prefetch=False)] + [
            dict(flat_prefetch=pf, flat_programs=pp, **{key: w})
            for pf, pp, w in itertools.product((False, True), map(int, a.programs.split(",")),
                                               map(int, a.warps.split(",")))]
        times = {i: ([], []) for i in range(len(settings))}
        for _ in range(a.rounds):
            for i, over in enumerate(settings):
                lk.TUNING.update(default, **over)
                try:
                    times[i][0].append(timer(lookup))
                    times[i][1].append(timer(step))
                except Exception as exc:  # noqa: BLE001 - out of resources: report, go on
                    log(f"  {over}: {type(exc).__name__}")
        lk.TUNING.update(default)
        res = []
        for i, over in enumerate(settings):
            if times[i][0]:
                res.append((statistics.median(times[i][1]), statistics.median(times[i][0]), i, over))
        base = res[0]
        log(f"{shape} N={a.context} decode threshold flat; default {settings[0]} (TUNING otherwise): lookup "
            f"{base[1]:.4f} ms, step {base[0]:.4f} ms")
        for st, lo, i, over in sorted(res):
            log(f"  step {st:.4f} ms ({st / base[0]:.3f}), lookup {lo:.4f} ms ({lo / base[1]:.3f}): {over}")
        del fns, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
