"""Launch settings of the one-launch flat threshold decode lookup (``kernels/lookup_fused.py``) against the
three-launch path, in one run: the lookup alone and the whole decode step (lookup + sparse attention) of the
synthetic layer of ``sqattn_index.bench`` (keep 10%), CUDA-graph timing with L2 flushed (``bench.Timer``).

    python benchmarks/gpu_fused_lookup_sweep.py [--shapes llama3-8b,llama2-7b] [--context 131072]
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.kernels import lookup_fused

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--programs", default="1,2,4")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--block-c", default="64")
    ap.add_argument("--poll", default="0,1,2")
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    default = dict(lookup_fused.TUNING)
    for shape in a.shapes.split(","):
        _, _, fns = build(shape, a.context, a.keep, 1, dev, hierarchical=False)
        step, lookup = fns["threshold"]
        lookup_fused.TUNING["enabled"] = False
        log(f"{shape} N={a.context}: three launches: lookup {timer(lookup):.4f} ms, step {timer(step):.4f} ms")
        res = []
        for pp, st, w, bc, poll in itertools.product(*(map(int, x.split(",")) for x in
                                                       (a.programs, a.stages, a.warps, a.block_c, a.poll))):
            lookup_fused.TUNING.update(default, enabled=True, programs_per_sm=pp, num_stages=st, num_warps=w,
                                       block_c=bc, poll=poll)
            try:
                ms = (timer(lookup), timer(step))
            except Exception as exc:  # noqa: BLE001 - e.g. a grid too large for a cooperative launch
                log(f"  programs/SM {pp} stages {st} warps {w} block_c {bc} poll {poll}: {type(exc).__name__}: "
                    f"{exc}"[:300])
                continue
            res.append((ms, (pp, st, w, bc, poll)))
            log(f"  programs/SM {pp} stages {st} warps {w} block_c {bc} poll {poll}: lookup {ms[0]:.4f} ms, "
                f"step {ms[1]:.4f} ms")
        best = min(res)
        log(f"{shape} best fused: lookup {best[0][0]:.4f} ms, step {best[0][1]:.4f} ms with (programs/SM, stages, "
            f"warps, block_c, poll) {best[1]}")
        lookup_fused.TUNING.update(default)
        del fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
