"""GPU: the prefill ratio (512 question tokens at a 128K fixed context, keep 10%) over alternating rounds of dense
and squeezed timing in one run, so that its spread is measured rather than read off single table runs.

Each round times every dense SDPA candidate of the benchmark (``bench_workload.dense_candidates``: flash,
cuDNN, ...) and the squeezed step (threshold selection, hierarchical lookup + sparse attention, as the table's
prefill rows; ``gpu_prefill_lookup_sweep.build``), CUDA graphs, L2 flushed (``bench.Timer``), and prints the
ratio of the fastest dense candidate to the squeezed step. The last line per shape gives the median and range.

    python benchmarks/gpu_prefill_rounds.py [--shapes llama3-8b,llama2-7b] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.bench_workload import dense_candidates

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, {a.tokens} question tokens, keep {a.keep}")
    for shape in a.shapes.split(","):
        layer, q, fns = build(shape, a.context, a.keep, a.tokens, dev)
        step, _ = fns["threshold"]
        dense = dense_candidates(q, layer)
        ratios = []
        for r in range(a.rounds):
            times = {}
            for name, fn in dense.items():
                try:
                    times[name] = timer(fn)
                except Exception as exc:  # noqa: BLE001 - a backend this build lacks: report, go on
                    log(f"  dense {name}: {type(exc).__name__}")
            sq = timer(step)
            best = min(times, key=times.get)
            ratios.append(times[best] / sq)
            log(f"{shape} round {r}: dense " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(times.items())) +
                f" ms; squeezed {sq:.4f} ms; best dense ({best}) / squeezed {ratios[-1]:.2f}x")
        log(f"{shape}: ratio median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x "
            f"over {len(ratios)} rounds")
        del layer, q, fns, step, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
