"""GPU A/B of the sparse attention kernel's loop form: plain (scores, softmax and values of tile i in turn) against
rotated (``config={"rotate": True}``: the scores of tile i + 1 are issued before the softmax of tile i, so the
asynchronous Hopper dot can run while the softmax does), for prefill (512 question tokens) and decode (one token)
at a 128K fixed context, keep 10%, on the synthetic clustered layer (``gpu_prefill_lookup_sweep.build``, threshold
selection). Rounds alternate the variants (CUDA graphs, L2 flushed, ``bench.Timer``); each line is one round.
It also checks that both forms give the same output, and times the whole prefill step with each.

    python benchmarks/gpu_sparse_rotate.py [--shapes llama3-8b,llama2-7b] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    from gpu_prefill_lookup_sweep import build  # this folder: scripts run as python benchmarks/...

    from sqattn_index.bench import Timer
    from sqattn_index.kernels import sparse_attention as sa

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--shapes", default="llama3-8b,llama2-7b")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device("cuda")
    timer = Timer(dev, a.reps)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"device {torch.cuda.get_device_name(dev)}; context {a.context}, keep {a.keep}")
    plain_config = sa._config
    for shape in a.shapes.split(","):
        layer = None
        for tokens in (512, 1):
            layer, q, fns = build(shape, a.context, a.keep, tokens, dev, layer=layer)
            step, lookup = fns["threshold"]
            _, _, pos, total = lookup()
            scale = q.shape[-1] ** -0.5
            base = sa._config(q.shape[1] // layer.keys.shape[0] * tokens, q.shape[-1], dev)
            variants = {"plain": {}, "rotate": {"rotate": True}}
            if tokens > 1:
                variants.update({
                    "rotate n64 s3": {"rotate": True, "BLOCK_N": 64, "num_stages": 3},
                    "rotate n64 s4": {"rotate": True, "BLOCK_N": 64, "num_stages": 4},
                    "rotate s2": {"rotate": True, "num_stages": 2},
                    "rotate m64 w4 n64 s3": {"rotate": True, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                                             "num_stages": 3},
                })
            else:
                variants.update({"rotate s3": {"rotate": True, "num_stages": 3},
                                 "rotate n32": {"rotate": True, "BLOCK_N": 32}})
            ref = sa.sparse_attention_positions(q, layer.keys, layer.values, pos, total, scale)[0]
            fns_v = {}
            for name, over in variants.items():
                fn = (lambda over=over, q=q, lay=layer: sa.sparse_attention_positions(
                    q, lay.keys, lay.values, pos, total, scale, config=over))
                try:
                    err = float((fn()[0] - ref).abs().max())
                except Exception as exc:  # noqa: BLE001 - out of resources for this tile: report, go on
                    log(f"{shape} T={tokens} {name}: {type(exc).__name__}")
                    continue
                fns_v[name] = fn
                log(f"{shape} T={tokens} {name} {dict(base, **over)}: max |out - plain| {err:.2e}")
            for r in range(a.rounds):
                times = {name: timer(fn) for name, fn in fns_v.items()}
                log(f"{shape} T={tokens} round {r}: " + ", ".join(f"{k} {v * 1000:.1f} us" for k, v in times.items()))
            if tokens > 1:
                for r in range(a.rounds):
                    res = {}
                    for name in ("plain", "rotate"):
                        sa._config = (plain_config if name == "plain" else
                                      lambda nq, d, dv: dict(plain_config(nq, d, dv), rotate=True))
                        res[name] = timer(step)
                    sa._config = plain_config
                    log(f"{shape} T={tokens} step round {r}: plain {res['plain']:.4f} ms, rotate "
                        f"{res['rotate']:.4f} ms")
            del q, fns, step, lookup
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
