"""How the L2 flush before each timed replay moves the benchmark's numbers (``bench.Timer``'s ``flush``), in one
run: "write" zeroes a 256 MB buffer before each replay (the table so far, as ``triton.testing.do_bench``), so
the step starts with the L2 full of dirty lines whose write-back shares DRAM with its reads; "read" sums the
buffer, so the L2 holds clean lines of other data (as after the weight reads that come before attention in
a decode step). Neither leaves the step's own data in the L2.

Per shape and context (keep 10%): the best dense SDPA backend, the squeezed decode step (flat lookup,
thresholds, 8-bit decode tables as the table's rows) and prefill step (512 tokens, hierarchical), the sparse
decode kernel alone and a device copy of the same bytes, under both flushes in alternating rounds.

    python benchmarks/gpu_flush_modes.py [--shapes llama3-8b,llama2-7b] [--contexts 131072] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench_workload import BenchConfig, Timer, dense_candidates
    from sqattn_index.kernels.sparse_attention import sparse_attention_positions

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no flush, no graphs)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    timers = {m: Timer(dev, a.reps, flush=m) for m in ("write", "read")}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cfg = BenchConfig()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"device {device_name}; keep {a.keep}; {a.rounds} alternating rounds of {a.reps} graph replays per flush "
        f"mode; times in ms (median of rounds)")
    for shape in a.shapes.split(","):
        for n in (int(c) for c in a.contexts.split(",")):
            layer, fns = None, {}
            for phase, t, flat in (("decode", 1, True), ("prefill", cfg.prefill_tokens if n > 4096 else 8, False)):
                layer, q, by_mode = build(shape, n, a.keep, t, dev, hierarchical=not flat, fp8=flat, layer=layer)
                d = q.shape[-1]
                scale = d ** -0.5
                step, lookup = by_mode["threshold"]
                fns[f"{phase} squeezed"] = step
                for name, fn in dense_candidates(q, layer).items():
                    fns[f"{phase} dense {name}"] = fn
                if phase == "decode":
                    _, _, pos, total = lookup()
                    kv_bytes = int(total.sum()) * d * 2 * 2
                    fns["decode sparse kernel"] = (lambda q=q, pos=pos, total=total: sparse_attention_positions(
                        q, layer.keys, layer.values, pos, total, scale))
                    src = torch.empty(kv_bytes, dtype=torch.uint8, device=dev).random_()
                    fns["copy of the sparse kernel's bytes"] = src.clone
            times = {(name, m): [] for name in fns for m in timers}
            for _ in range(a.rounds):
                for m, timer in timers.items():
                    for name, fn in fns.items():
                        try:
                            times[(name, m)].append(timer(fn))
                        except Exception as exc:  # a dense backend that cannot be captured, ...
                            times[(name, m)].append(float("nan"))
                            log(f"  {name} ({m}): {type(exc).__name__}")
            med = {k: statistics.median(v) for k, v in times.items()}
            log(f"\n{shape} {n}:")
            for name in fns:
                log(f"  {name:45s} write {med[(name, 'write')]:.4f}  read {med[(name, 'read')]:.4f}")
            for m in timers:
                for phase in ("decode", "prefill"):
                    dense = min(v for (name, mm), v in med.items() if mm == m and name.startswith(f"{phase} dense"))
                    log(f"  [{m} flush] {phase}: best dense {dense:.4f} / squeezed {med[(f'{phase} squeezed', m)]:.4f}"
                        f" = {dense / med[(f'{phase} squeezed', m)]:.2f}x")
                sparse, copy = med[("decode sparse kernel", m)], med[("copy of the sparse kernel's bytes", m)]
                achieved, copy_gbps = kv_bytes / (sparse * 1e6), 2 * kv_bytes / (copy * 1e6)
                log(f"  [{m} flush] sparse kernel {kv_bytes / 1e6:.1f} MB: {achieved:.0f} GB/s; copy of the same bytes "
                    f"{copy_gbps:.0f} GB/s (read + written): {achieved / copy_gbps:.2f} of it")
            del layer, fns, src
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
