"""Programmatic dependent launch (``kernels/chain.py``) on and off, in one run: squeezed decode and prefill
steps of the synthetic layer of ``sqattn_index.bench`` (keep 10%), timed as CUDA graphs with L2 flushed
(``bench.Timer``), alternating on/off rounds so drift hits both alike; the best dense SDPA backend is timed
once per phase for the speedup. Decode uses the flat lookup (``sqattn bench --flat-decode``), prefill the
hierarchical one, as the benchmark table does.

Policies (``--policies``): ``off`` and ``early`` (PDL on: every chain kernel lets the next one launch at its
start). The session-10 runs also timed ``late:NAME`` policies (kernels letting the next launch only when they
end), removed since; their numbers are in docs/bench/session10/pdl_policies.txt.

    python benchmarks/gpu_pdl_ab.py [--shapes llama3-8b,llama2-7b] [--contexts 32768,131072] [--rounds 3]
        [--phases decode,prefill] [--policies off,early]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer, best_dense
    from sqattn_index.kernels import chain

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--modes", default="threshold,budget")
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--policies", default="off,early")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    policies = a.policies.split(",")

    def set_policy(p: str) -> None:
        if p not in ("off", "early"):
            raise SystemExit(f"unknown policy {p!r}: give off and/or early")
        chain.SETTINGS["pdl"] = p == "early"

    log(f"device {torch.cuda.get_device_name(dev)}; keep {a.keep}; {a.rounds} alternating rounds of {a.reps} "
        f"graph replays per setting")
    for shape in a.shapes.split(","):
        for n in (int(c) for c in a.contexts.split(",")):
            for phase, tokens, flat in (("decode", 1, True), ("prefill", a.prefill_tokens, False)):
                if phase not in a.phases.split(","):
                    continue
                layer, q, fns = build(shape, n, a.keep, tokens, dev, hierarchical=not flat)
                dense_ms, dense_name = best_dense(q, layer, timer, lambda m: None)
                for mode in a.modes.split(","):
                    step, _ = fns[mode]
                    times = {p: [] for p in policies}
                    for _ in range(a.rounds):
                        for p in policies:
                            set_policy(p)
                            times[p].append(timer(step))
                    set_policy("early")
                    med = {p: statistics.median(t) for p, t in times.items()}
                    base = med[policies[0]]
                    log(f"{shape} N={n} {phase} {mode}: dense ({dense_name}) {dense_ms:.4f} ms | " + " | ".join(
                        f"{p} {med[p]:.4f} ms ({dense_ms / med[p]:.2f}x, {med[p] / base:.3f} of {policies[0]})"
                        for p in policies))
                    log("    rounds: " + "; ".join(f"{p} {[round(t, 4) for t in times[p]]}" for p in policies))
                del layer, q, fns
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
