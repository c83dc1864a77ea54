"""Compile the package's Triton kernel launches for an H100 (sm_90) on a machine without a GPU.

The interpreter tests (``TRITON_INTERPRET=1``) check what the kernels compute, not whether the GPU compiler
accepts them. This script runs the host code of the decode and prefill paths on CPU tensors of benchmark
shapes with the GPU launch settings (interpreter switches off, Hopper tile configs, 132 multiprocessors),
records every launch instead of running it, and compiles each distinct (kernel, argument types, constexprs,
num_warps, num_stages) to a cubin with Triton's own compiler and ``ptxas`` for ``GPUTarget("cuda", 90, 32)``.
Nothing is timed and no result is checked: outputs of unlaunched kernels are left uninitialised.

    python benchmarks/compile_sm90.py [--context 32768]

Prints one line per compiled launch (registers, spills, shared memory) and exits non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _record_launches():
    from triton.runtime.jit import JITFunction

    launches = []

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = fake_run
    return launches


def _gpu_settings():
    """Make the host code pick the settings it picks on an H100."""
    from sqattn_index.kernels import lookup_level, sparse_attention

    lookup_level._interpret = lambda: False
    sparse_attention._interpret = lambda: False
    sparse_attention._num_sms = lambda device: 132
    config = sparse_attention._config

    class _Cuda:
        type = "cuda"

    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    sparse_attention._config = lambda nq, d, device: config(nq, d, _Cuda())


def _drive(context: int) -> None:
    """The decode (Llama-2-7B and Llama-3-8B shapes; 16- and 8-bit centroid tables) and prefill launches of the
    lookup and the attention."""
    from sqattn_index.bench import SHAPES, BenchConfig, make_queries, synthetic_layer
    from sqattn_index.kernels import lookup as lk
    from sqattn_index.kernels.always_logz import always_logz
    from sqattn_index.kernels.fused_attention import sparse_attention_with_new_tokens
    from sqattn_index.kernels.merge import lse_merge
    from sqattn_index.kernels.positions import segment_lows
    from sqattn_index.kernels.sparse_attention import sparse_attention_positions

    dev = torch.device("cpu")
    for shape in ("llama2-7b", "llama3-8b"):
        hq, hk, d = SHAPES[shape]
        layer = synthetic_layer(hk, context, d, torch.bfloat16, dev, BenchConfig())
        lows = segment_lows(layer.fine_offsets, context, layer.window)
        base = (layer.fine_centroids, layer.fine_sizes, layer.coarse_centroids, layer.coarse_sizes,
                layer.coarse_offsets)
        kw = dict(seg_lows=lows, num_tokens=context, sink_tokens=layer.sink, window_tokens=layer.window,
                  fine_spread=layer.fine_spread, coarse_spread=layer.coarse_spread,
                  always_keys=(layer.keys, layer.sink, layer.window),
                  counter=(torch.zeros(2, dtype=torch.int64), 512, 260, 1 << 20))
        for t in (1, 64, 512):  # decode, a 64-token question, prefill of a 512-token one
            q = make_queries(layer, hq, t, seed=1)
            qg = q.reshape(1, hk, (hq // hk) * t, d)
            budget = torch.full((1, hk), 0.1 * context)
            thr = torch.full((hk,), 1e-4)
            for hier in (False, True):
                lk.centroid_lookup_positions(qg, *base, None, None, budget, budget * 3, d ** -0.5, hier, **kw)
                lk.centroid_lookup_positions(qg, *base, thr, thr, None, None, d ** -0.5, hier, **kw)
                if t == 1:  # decode on the 8-bit tables (SqueezeConfig.centroid_precision="fp8")
                    f8 = layer.fp8_tables()
                    base8 = (f8["fine_centroids"], layer.fine_sizes, f8["coarse_centroids"], layer.coarse_sizes,
                             layer.coarse_offsets)
                    scales = dict(fine_centroid_scales=f8["fine_centroid_scales"],
                                  coarse_centroid_scales=f8["coarse_centroid_scales"])
                    lk.centroid_lookup_positions(qg, *base8, thr, thr, None, None, d ** -0.5, hier, **kw, **scales)
                    lk.centroid_lookup_positions(qg, *base8, None, None, budget, budget * 3, d ** -0.5, hier, **kw,
                                                 **scales)
            pos = torch.zeros(1, hk, context, dtype=torch.int32)
            total = torch.full((1, hk), context // 10, dtype=torch.int32)
            sparse_attention_positions(q, layer.keys, layer.values, pos, total, d ** -0.5)
            new_k = torch.zeros(1, hk, 64, d, dtype=torch.bfloat16)
            if t <= 64:
                sparse_attention_with_new_tokens(q, layer.keys, layer.values, pos, total, new_k, new_k.clone(),
                                                 torch.arange(t), d ** -0.5)
            always_logz(qg, layer.keys, layer.sink, layer.window, d ** -0.5)
            out = torch.zeros(1, hq, t, d)
            lse = torch.zeros(1, hq, t)
            lse_merge(out, lse, out.clone(), lse.clone())


def _usage(cubin: bytes) -> str:
    """Registers and spill bytes per thread, from ``cuobjdump --dump-resource-usage`` (bundled with Triton)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return f"regs {regs.group(1) if regs else '?'} stack {stack.group(1) if stack else '?'}"


def _compile(launches) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    target = GPUTarget("cuda", 90, 32)
    seen, failed = set(), 0
    for fn, args, kwargs in launches:
        bound = dict(zip(fn.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        signature, constexprs = {}, {}
        for p in fn.params:
            v = bound.get(p.name, p.default)
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", v
            else:
                signature[p.name] = mangle_type(v)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        shown = {k: v for k, v in constexprs.items() if isinstance(v, (int, bool)) and not isinstance(v, str)}
        t0 = time.perf_counter()
        try:
            k = triton.compile(ASTSource(fn, signature, constexprs), target=target, options=options)
            print(f"ok   {fn.__name__:28s} {options} {_usage(k.asm['cubin'])} smem {k.metadata.shared} "
                  f"({time.perf_counter() - t0:.1f} s) {shown}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAIL {fn.__name__:28s} {options} {shown}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    print(f"{len(seen)} distinct launches compiled for sm_90, {failed} failed")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--tuning", default="{}",
                    help='JSON overrides of kernels.lookup.TUNING, e.g. \'{"block_warps": 4}\'')
    ap.add_argument("--only", default="", help="compile only launches of kernels whose name contains this")
    args = ap.parse_args()
    from sqattn_index.kernels import lookup

    lookup.TUNING.update(json.loads(args.tuning))
    launches = _record_launches()
    _gpu_settings()
    _drive(args.context)
    sys.exit(1 if _compile([x for x in launches if args.only in x[0].__name__]) else 0)


if __name__ == "__main__":
    main()
