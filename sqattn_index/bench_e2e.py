"""End-to-end GPU benchmark: Hugging Face generation over one precomputed fixed-context cache, squeezed
(Triton backend) against dense (SDPA), on random-weight Llama-shaped models with a reduced layer count
(per-layer shapes kept: hidden 4096, 32 query heads, head_dim 128), plus the index-build breakdown and a
check that the Triton path gives the reference path's tokens.

    python -m sqattn_index.bench_e2e --out docs/bench [--contexts 32768,131072] [--layers 8]

Rows appended to ``OUT/results.json`` use the schema of ``sqattn_index.bench``: phase ``e2e_ttft`` (time
to first token of a 64-token question), ``e2e_decode`` (median per-token latency of 32 greedy steps) and
``build`` (prefill vs clustering + calibration of the fixed context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .calibration import calibrate_layer
from .clustering import build_layer_clusters
from .corpus_kv import CorpusKV
from .hf_attention import SqueezedCache, active_cache, install_attention
from .kernels.dispatch import get_ops
from .kv_capture import capture_kv
from .model_loading import LocalModel
from .selection import SelectionSpec

SHAPES = {
    "llama2-7b": dict(num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008),
    "llama3-8b": dict(num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336),
}
LADDER = (0.3, 0.2, 0.1, 0.05)


def make_model(shape: str, layers: int, max_pos: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, num_hidden_layers=layers, head_dim=128, vocab_size=32000,
                      max_position_embeddings=max_pos, rope_theta=500000.0, **SHAPES[shape])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    install_attention(model)
    return LocalModel(model=model, tokenizer=None, model_id=f"random-{shape}-{layers}L", device=device,
                      dtype=torch.bfloat16)


def compile_common(model) -> None:
    """torch.compile the parts of every layer that the squeezed and the dense runs share (RMSNorms, MLP,
    rotary tables and their application), so that each turns into a few fused kernels instead of about fifty
    small eager ones per layer; attention and the caches stay as they are. Applies to both sides alike."""
    from transformers.models.llama import modeling_llama

    inner = model.model
    for layer in inner.layers:
        layer.input_layernorm.forward = torch.compile(layer.input_layernorm.forward)
        layer.post_attention_layernorm.forward = torch.compile(layer.post_attention_layernorm.forward)
        layer.mlp.forward = torch.compile(layer.mlp.forward)
    inner.norm.forward = torch.compile(inner.norm.forward)
    inner.rotary_emb.forward = torch.compile(inner.rotary_emb.forward)
    modeling_llama.apply_rotary_pos_emb = torch.compile(modeling_llama.apply_rotary_pos_emb)


def sync_time(fn):
    """(fn(), seconds), with the GPU synchronised around it (when there is one)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def build_corpus(local: LocalModel, n: int, chunk: int):
    ids = torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(1))
    captured, t_prefill = sync_time(lambda: capture_kv(local, ids, chunk=chunk, window=64))

    def cluster():
        return [build_layer_clusters(k, v, 4, 64, 16, 4, 12, i) for i, (k, v) in
                enumerate(zip(captured.keys, captured.values))]

    layers, t_cluster = sync_time(cluster)

    def calibrate():
        for layer, q in zip(layers, captured.window_queries):
            calibrate_layer(layer, q, LADDER, local.head_dim ** -0.5, 5.0, hierarchical=HIERARCHICAL)

    _, t_calib = sync_time(calibrate)
    return captured, CorpusKV(ids, layers, LADDER), {"prefill": t_prefill, "clustering": t_cluster,
                                                     "calibration": t_calib}


def _first_and_tokens(local, corpus, n, question, ops, keep: float, steps: int = 8):
    """((greedy tokens, first-step logits), cache) of a squeezed generation at ``keep`` through ``ops``."""
    cache = SqueezedCache(corpus, _spec(keep), ops)
    toks, first, _, _ = generate(local, cache, n, question, steps, True)
    return (toks, first), cache


def _check_row(phase, label, a, b, shape, n, keep, dev_name, log) -> dict:
    """Compare two generations (tokens, first-step logits): log it and return the result row."""
    same = a[0] == b[0]
    diff = float((a[1] - b[1]).abs().max())
    scale = float(a[1].abs().max())
    log(f"  {label}: same {len(a[0])} greedy tokens: {same}; first-step max |dlogit| {diff:.4f} "
        f"(max |logit| {scale:.2f})")
    return {"phase": phase, "shape": shape, "context": n, "keep": keep, "same_tokens": same, "max_logit_diff": diff,
            "max_logit": scale, "device": dev_name}


@torch.inference_mode()
def generate(local: LocalModel, cache, n_fixed: int, question: torch.Tensor, steps: int, squeezed: bool,
             step_logits: list | None = None):
    """Greedy: prefill ``question`` then ``steps`` tokens. Returns (tokens, first logits, ttft, per-step).
    ``step_logits``: a list that gets the float32 logits each token was chosen from (first included)."""
    model = local.model
    dev = local.device

    def fwd(ids, start):
        pos = torch.arange(start, start + ids.shape[-1], device=dev).unsqueeze(0)
        if squeezed:
            with active_cache(cache):
                return model(input_ids=ids.view(1, -1), position_ids=pos, past_key_values=cache, use_cache=True,
                             logits_to_keep=1).logits[0, -1]
        return model(input_ids=ids.view(1, -1), position_ids=pos, past_key_values=cache, use_cache=True,
                     logits_to_keep=1).logits[0, -1]

    q = question.to(dev)
    logits, ttft = sync_time(lambda: fwd(q, n_fixed))
    first = logits.float().clone()
    tokens = [int(logits.argmax())]
    if step_logits is not None:
        step_logits.append(first)
    times = []
    pos = n_fixed + len(q)
    for _ in range(steps):
        logits, dt = sync_time(lambda: fwd(torch.tensor([tokens[-1]], device=dev), pos))
        times.append(dt)
        tokens.append(int(logits.argmax()))
        if step_logits is not None:
            step_logits.append(logits.float().clone())
        pos += 1
    return tokens, first, ttft, times


@torch.inference_mode()
def generate_graphed(local: LocalModel, cache, n_fixed: int, question: torch.Tensor, steps: int, graph: bool = True):
    """As ``generate`` over a static-buffer ``SqueezedCache``: eager question prefill, then decode steps
    replayed from one CUDA graph (``graph_decode.GraphDecodeStep``; the first step captures), or run eagerly
    through the same static buffers with ``graph=False`` (the check that replay computes what eager does).
    Returns (tokens, first logits, ttft, per-step seconds, per-step logits)."""
    from .graph_decode import GraphDecodeStep

    dev = local.device
    q = question.to(dev)
    cache.set_slots(0, len(q))
    pos = torch.arange(n_fixed, n_fixed + len(q), device=dev).unsqueeze(0)

    def prefill():
        with active_cache(cache):
            return local.model(input_ids=q.view(1, -1), position_ids=pos, past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[0, -1]

    logits, ttft = sync_time(prefill)
    first = logits.float().clone()
    tokens = [int(logits.argmax())]
    step = GraphDecodeStep(local.model, cache, n_fixed)
    run = step if graph else step.eager
    times, all_logits = [], []
    for i in range(steps):
        logits, dt = sync_time(lambda: run(tokens[-1], len(q) + i))
        times.append(dt)
        all_logits.append(logits.float())
        tokens.append(int(logits.argmax()))
    return tokens, first, ttft, times, all_logits


def graphed_rows(local, corpus, n, question, keep, steps, reps, shape, layers, dev_name, eager_tokens, rows, log):
    """Decode with CUDA graphs: squeezed (Triton) against dense FlashAttention over the same cache."""
    res = {}
    for label in ("dense", "squeezed"):
        decs, ttfts = [], []
        for _ in range(reps):
            spec = _spec(1.0 if label == "dense" else keep)
            cache = SqueezedCache(corpus, spec, get_ops("triton"), capacity=len(question) + steps + 1)
            if label == "dense":
                cache.dense_backend = "flash"
            toks, _, ttft, times, step_logits = generate_graphed(local, cache, n, question, steps)
            decs.append(statistics.median(times[2:]))
            ttfts.append(ttft)
        res[label] = {"decode": min(decs), "ttft": min(ttfts), "tokens": toks, "budget": cache.kv_budget,
                      "logits": step_logits}
        log(f"  {label:>8} (CUDA graph decode): ttft {1e3 * min(ttfts):.2f} ms, decode {1e3 * min(decs):.3f} ms/token"
            f", KV budget {cache.kv_budget:.3f}")
    same = res["squeezed"]["tokens"] == eager_tokens
    log(f"  graphed squeezed tokens equal the eager (growing-cache) squeezed tokens: {same}")
    cache = SqueezedCache(corpus, _spec(keep), get_ops("triton"),
                          capacity=len(question) + steps + 1)
    static_toks, _, _, _, static_logits = generate_graphed(local, cache, n, question, steps, graph=False)
    gt = res["squeezed"]["tokens"]
    common = next((i for i in range(1, len(gt)) if gt[i] != static_toks[i]), len(gt))  # same inputs up to here
    diffs = [float((a - b).abs().max()) for a, b in zip(static_logits[:common], res["squeezed"]["logits"])]
    log(f"  graph replay vs the same static-buffer steps run eagerly: same {steps + 1} tokens "
        f"{static_toks == gt}; max |dlogit| over the {len(diffs)} steps with equal inputs {max(diffs):.4g}")
    d, s = res["dense"]["decode"] * 1e3, res["squeezed"]["decode"] * 1e3
    rows.append({"phase": "e2e_decode_graph", "shape": shape, "context": n, "keep": keep, "layers": layers,
                 "centroids": CENTROIDS,
                 "dense_ms": d, "squeezed_ms": s, "speedup": d / s, "kv_budget": float(res["squeezed"]["budget"]),
                 "budget_slack": BUDGET_SLACK, "selection": SELECTION, "hierarchical": HIERARCHICAL,
                 "compiled_common": COMPILE,
                 "same_tokens_as_eager": same, "achieved_gbps": None, "copy_gbps": None, "device": dev_name})


PROFILE = False
GRAPHS = False
SELECTION = "budget"  # the engine's default (SqueezeConfig.selection); --selection threshold for in-kernel
BUDGET_SLACK = 0.0  # --budget-slack: the budget search may stop at (1 + this) x the budget (SqueezeConfig)
HIERARCHICAL = True  # --flat: one lookup level over every fine centroid (SqueezeConfig.hierarchical=False)
COMPILE = False  # --compile-common: torch.compile the layer parts both sides share (compile_common)
CENTROIDS = "model"  # --fp8-centroids: decode lookups score 8-bit tables (SqueezeConfig.centroid_precision)


def _spec(keep: float) -> SelectionSpec:
    """The benchmark's selection at ``keep`` (1.0: dense), with the command line's mode and budget slack."""
    return SelectionSpec(keep=keep, mode=SELECTION, budget_slack=BUDGET_SLACK, hierarchical=HIERARCHICAL,
                         centroid_precision=CENTROIDS)


def profile_decode(local, corpus, n, question, keep, log) -> None:
    """torch.profiler over 4 squeezed decode steps: where the per-token time goes."""
    from torch.profiler import ProfilerActivity, profile

    cache = SqueezedCache(corpus, _spec(keep), get_ops("triton"))
    generate(local, cache, n, question, 2, True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(local, cache, n + len(question) + 3, question[:1], 4, True)
    log(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


@torch.inference_mode()
def profile_graph_decode(local, corpus, n, question, keep, log) -> None:
    """torch.profiler over 4 replays of the captured decode step, dense (FlashAttention) and squeezed: the
    kernels of one token, per step."""
    from torch.profiler import ProfilerActivity, profile

    from .graph_decode import GraphDecodeStep

    q = question.to(local.device)
    for label in ("dense", "squeezed"):
        spec = _spec(1.0 if label == "dense" else keep)
        cache = SqueezedCache(corpus, spec, get_ops("triton"), capacity=len(q) + 8)
        if label == "dense":
            cache.dense_backend = "flash"
        cache.set_slots(0, len(q))
        with active_cache(cache):
            local.model(input_ids=q.view(1, -1), position_ids=torch.arange(n, n + len(q), device=q.device)[None],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = GraphDecodeStep(local.model, cache, n)
        step(int(q[-1]), len(q))  # capture
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(4):
                step(int(q[-1]), len(q) + 1 + i)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
        total_us = sum(e.self_device_time_total for e in events) / 4
        launches = sum(e.count for e in events) / 4
        log(f"  graph replay profile, {label}: {launches:.0f} kernels and {total_us / 1e3:.3f} ms of kernel time "
            f"per token ({total_us / 1e3 / max(len(corpus.layers), 1):.3f} ms per layer)")
        log(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))


def dense_cache(captured):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(captured.keys, captured.values)):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
    return cache


def run_shape(shape: str, contexts: list[int], layers: int, keep: float, steps: int, reps: int, chunk: int,
              device: torch.device, rows: list[dict], log) -> None:
    local = make_model(shape, layers, max(contexts) + 4096, device)
    model = local.model
    if COMPILE:
        compile_common(model)
    dev_name = torch.cuda.get_device_name(device)
    question = torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(2))
    for n in contexts:
        captured, corpus, build = build_corpus(local, n, chunk)
        log(f"[{shape} {layers}L N={n}] build: " + ", ".join(f"{k} {v:.2f} s" for k, v in build.items()))
        rows.append({"phase": "build", "shape": shape, "context": n, "keep": None, "layers": layers,
                     "prefill_s": build["prefill"], "clustering_s": build["clustering"],
                     "calibration_s": build["calibration"], "dense_ms": None, "squeezed_ms": None,
                     "speedup": None, "achieved_gbps": None, "copy_gbps": None, "device": dev_name})
        dense = dense_cache(captured)
        del captured
        torch.cuda.empty_cache()
        res = {}
        for label in ("dense", "squeezed"):
            ttfts, decs, toks = [], [], None
            for _ in range(reps):
                if label == "dense":
                    model.set_attn_implementation("sdpa")
                    dense.crop(n)
                    cache = dense
                else:
                    model.set_attn_implementation("sqattn")
                    cache = SqueezedCache(corpus, _spec(keep), get_ops("triton"))
                toks, first, ttft, times = generate(local, cache, n, question, steps, label == "squeezed")
                ttfts.append(ttft)
                decs.append(statistics.median(times[2:]))
            res[label] = {"ttft": min(ttfts), "decode": min(decs), "tokens": toks, "first": first,
                          "budget": getattr(cache, "kv_budget", 1.0)}
            log(f"  {label:>8}: ttft {1e3 * res[label]['ttft']:.2f} ms, decode {1e3 * res[label]['decode']:.3f} "
                f"ms/token")
        model.set_attn_implementation("sqattn")
        if GRAPHS:
            graphed_rows(local, corpus, n, question, keep, steps, reps, shape, layers, dev_name,
                         res["squeezed"]["tokens"], rows, log)
        if PROFILE:
            profile_decode(local, corpus, n, question, keep, log)
            if GRAPHS:
                try:  # diagnostics only: a profiler quirk must not cost the measured rows
                    profile_graph_decode(local, corpus, n, question, keep, log)
                except Exception as exc:  # noqa: BLE001
                    log(f"  graph replay profile failed: {exc!r}")
        for phase, key in (("e2e_ttft", "ttft"), ("e2e_decode", "decode")):
            d, s = res["dense"][key] * 1e3, res["squeezed"][key] * 1e3
            rows.append({"phase": phase, "shape": shape, "context": n, "keep": keep, "layers": layers,
                         "centroids": CENTROIDS,
                         "dense_ms": d, "squeezed_ms": s, "speedup": d / s,
                         "kv_budget": float(res["squeezed"]["budget"]), "budget_slack": BUDGET_SLACK,
                         "selection": SELECTION, "hierarchical": HIERARCHICAL, "compiled_common": COMPILE,
                         "achieved_gbps": None, "copy_gbps": None, "device": dev_name})
        # Same inputs through the torch reference path: tokens and first-step logits; then the floor of that
        # comparison, the same two paths with nothing dropped (keep 1.0: every fixed key through the Triton
        # kernels vs through the torch reference, so only the kernels' rounding differs); then two exact
        # dense implementations of Hugging Face itself (sdpa, as timed, vs eager attention) over the same
        # cache: the bf16 tolerance of this model.
        for phase, label, k in (("check", "triton vs torch reference", keep),
                                ("check_keep_all", "same check with nothing dropped (keep 1.0)", 1.0)):
            ref, _ = _first_and_tokens(local, corpus, n, question, get_ops("torch"), k)
            tri, _ = _first_and_tokens(local, corpus, n, question, get_ops("triton"), k)
            rows.append(_check_row(phase, label, ref, tri, shape, n, k, dev_name, log))
        model.set_attn_implementation("eager")
        dense.crop(n)
        eager_toks, eager_first, _, _ = generate(local, dense, n, question, 8, False)
        model.set_attn_implementation("sqattn")
        rows.append(_check_row("check_hf_dense", "HF eager vs HF sdpa attention (dense, exact both)",
                               (eager_toks, eager_first), (res["dense"]["tokens"][:9], res["dense"]["first"]),
                               shape, n, 1.0, dev_name, log))
        del dense, corpus
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sqattn_index.bench_e2e")
    ap.add_argument("--out", default="docs/bench")
    ap.add_argument("--shapes", default="llama2-7b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--graphs", action="store_true",
                    help="also decode with CUDA graphs: squeezed vs dense FlashAttention over the same cache")
    ap.add_argument("--selection", choices=("budget", "threshold"), default="budget")
    ap.add_argument("--budget-slack", type=float, default=0.0)
    ap.add_argument("--flat", action="store_true", help="flat lookup (every fine centroid, no coarse level)")
    ap.add_argument("--compile-common", action="store_true",
                    help="torch.compile the norms, MLP and rotary parts of both sides (not attention)")
    ap.add_argument("--fp8-centroids", action="store_true",
                    help="decode lookups score 8-bit centroid tables (SqueezeConfig.centroid_precision='fp8')")
    args = ap.parse_args(argv)
    global PROFILE, GRAPHS, SELECTION, BUDGET_SLACK, HIERARCHICAL, COMPILE, CENTROIDS
    HIERARCHICAL, COMPILE = not args.flat, args.compile_common
    CENTROIDS = "fp8" if args.fp8_centroids else "model"
    PROFILE, GRAPHS, SELECTION = args.profile, args.graphs, args.selection
    BUDGET_SLACK = args.budget_slack
    device = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    for shape in args.shapes.split(","):
        run_shape(shape, [int(c) for c in args.contexts.split(",")], args.layers, args.keep, args.steps, args.reps,
                  args.chunk, device, rows, log)
    (out / "e2e_results.json").write_text(json.dumps(rows, indent=2) + "\n")
    results = out / "results.json"
    table = json.loads(results.read_text()) if results.exists() else []
    phases = ("e2e_ttft", "e2e_decode", "e2e_decode_graph")
    table = [r for r in table if r.get("phase") not in phases + ("build_e2e",)]
    table += [r for r in rows if r["phase"] in phases]
    results.write_text(json.dumps(table, indent=2) + "\n")
    (out / "e2e_log.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
