"""Exact incremental updates of a squeezed corpus.

Insert: the new texts are prefilled as a continuation of the fixed context (attending to its exact KV),
so their K/V equal a from-scratch build; their keys join the nearest fine clusters (a full re-cluster
once the appended share passes ``SqueezeConfig.recluster_share``) and the thresholds are re-calibrated.
Delete: the texts' tokens (and one separator) are removed and every token after them is re-encoded at
its new position, then the layers are re-clustered and re-calibrated.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from .calibration import calibrate_layer
from .clustering import assemble_layer, assign_to_nearest, build_layer_clusters
from .corpus_kv import CorpusKV, LayerKV
from .errors import ConfigError, ContextTooLongError
from .hf_attention import QueryCapture, capturing
from .prompt_layout import NODE_SEPARATOR

__all__ = ["append_texts", "remove_texts", "original_order"]


def original_order(layer: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values [Hk, N, D] of ``layer`` back in original token order."""
    inv = torch.argsort(layer.perm, dim=1)  # sorted position of each original position
    idx = inv.unsqueeze(-1).expand_as(layer.keys)
    return torch.gather(layer.keys, 1, idx), torch.gather(layer.values, 1, idx)


def _fine_labels_original(layer: LayerKV) -> torch.Tensor:
    """Fine cluster of every clustered token, indexed by original position - sink: [Hk, M]."""
    s, e = layer.clustered_range
    pos = torch.arange(s, e, device=layer.perm.device)
    labels_sorted = torch.searchsorted(layer.fine_offsets[:, 1:].contiguous(),
                                       pos.expand(layer.num_kv_heads, -1).contiguous(), right=True)
    out = torch.empty_like(labels_sorted)
    out.scatter_(1, layer.perm[:, s:e] - s, labels_sorted)
    return out


def _coarse_of_fine(layer: LayerKV) -> torch.Tensor:
    idx = torch.arange(layer.num_fine, device=layer.perm.device).expand(layer.num_kv_heads, -1).contiguous()
    return torch.searchsorted(layer.coarse_offsets[:, 1:].contiguous(), idx, right=True)


@torch.inference_mode()
def _continue_prefill(engine, past: list[tuple[torch.Tensor, torch.Tensor]], new_ids: torch.Tensor):
    """Prefill ``new_ids`` after ``past`` (per layer original-order keys/values [Hk, P, D]).

    Returns per layer full keys/values [Hk, P + A, D] and the window queries [Hq, <=W, D]."""
    local, cfg = engine.local, engine.config
    cache = DynamicCache()
    for i, (k, v) in enumerate(past):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
    capture = QueryCapture(cfg.window_tokens)
    ids = new_ids.to(local.device).view(1, -1)
    with capturing(capture):
        for start in range(0, ids.shape[1], cfg.prefill_chunk):
            local.model(input_ids=ids[:, start:start + cfg.prefill_chunk], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
    kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return kv, [capture.queries[i] for i in range(len(kv))]


def _calibrate_all(engine, layers: list[LayerKV], window_queries: list[torch.Tensor]) -> None:
    for layer, q in zip(layers, window_queries):
        cfg = engine.config
        calibrate_layer(layer, q, cfg.keep_ladder, engine.scale, cfg.coarse_slack, variance_term=cfg.variance_term,
                        always_in_normaliser=cfg.always_in_normaliser, hierarchical=cfg.hierarchical)


def append_texts(engine, corpus: CorpusKV, spans: list[tuple[int, int]], texts: list[str]
                 ) -> tuple[CorpusKV, list[tuple[int, int]]]:
    """Append ``texts`` after the corpus's last text. Returns the new corpus and all spans."""
    if not texts:
        return corpus, list(spans)
    cfg = engine.config
    sep = engine.layout._encode(NODE_SEPARATOR)
    added: list[int] = []
    new_spans = list(spans)
    n = corpus.num_tokens
    for text in texts:
        if new_spans or added:
            added += sep
        piece = engine.layout._encode(text)
        new_spans.append((n + len(added), n + len(added) + len(piece)))
        added += piece
    total = n + len(added)
    if total >= engine.local.max_positions:
        raise ContextTooLongError(f"after the insert the fixed context would have {total} tokens but the model has "
                                  f"{engine.local.max_positions} positions; build a separate index for the new texts.")
    t0 = time.perf_counter()
    past = [original_order(layer) for layer in corpus.layers]
    kv, window_q = _continue_prefill(engine, past, torch.tensor(added, dtype=torch.long))
    t1 = time.perf_counter()
    recluster = len(added) / total > cfg.recluster_share
    layers = []
    for i, ((k, v), old) in enumerate(zip(kv, corpus.layers)):
        if recluster:
            layers.append(build_layer_clusters(k, v, cfg.sink_tokens, cfg.window_tokens, cfg.keys_per_fine,
                                               cfg.fine_per_coarse, cfg.kmeans_iters, cfg.seed + i))
            continue
        sink = old.sink_tokens
        window = min(cfg.window_tokens, total - sink - 1)
        old_end = n - old.window_tokens  # old clustered tokens: [sink, old_end)
        fresh = assign_to_nearest(k[:, old_end:total - window], old.fine_centroids)
        labels = torch.cat([_fine_labels_original(old), fresh], dim=1)
        layers.append(assemble_layer(k, v, sink, window, labels, _coarse_of_fine(old), old.num_coarse))
    t2 = time.perf_counter()
    _calibrate_all(engine, layers, window_q)
    t3 = time.perf_counter()
    ids = torch.cat([corpus.input_ids, torch.tensor(added, dtype=torch.long)])
    seconds = {"prefill": t1 - t0, "clustering": t2 - t1, "calibration": t3 - t2, "reclustered": float(recluster)}
    return CorpusKV(ids, layers, tuple(cfg.keep_ladder), seconds), new_spans


def remove_texts(engine, corpus: CorpusKV, spans: list[tuple[int, int]], indices: list[int]
                 ) -> tuple[CorpusKV, list[tuple[int, int]]]:
    """Remove the texts at ``indices`` (positions in ``spans``) with their separators; re-encode what follows."""
    drop = sorted(set(indices))
    if any(not 0 <= i < len(spans) for i in drop):
        raise ConfigError(f"text indices must lie in [0, {len(spans)}); got {drop}.")
    if len(drop) == len(spans):
        raise ConfigError("cannot delete every document of an index; build a new index instead.")
    cut = torch.ones(corpus.num_tokens, dtype=torch.bool)
    for i in drop:
        s, e = spans[i]
        if i + 1 < len(spans):
            e = spans[i + 1][0]  # the node and the separator after it
        else:
            s = spans[i - 1][1]  # the last node: the separator before it
        cut[s:e] = False
    keep_ids = corpus.input_ids[cut]
    # Re-encode from the first removed token, or earlier so the new observation window's queries exist.
    first = min(int((~cut).nonzero()[0]), max(len(keep_ids) - engine.config.window_tokens, 0))
    t0 = time.perf_counter()
    past = [tuple(t[:, :first] for t in original_order(layer)) for layer in corpus.layers]
    kv, window_q = _continue_prefill(engine, past, keep_ids[first:])
    t1 = time.perf_counter()
    cfg = engine.config
    layers = [build_layer_clusters(k, v, cfg.sink_tokens, cfg.window_tokens, cfg.keys_per_fine, cfg.fine_per_coarse,
                                   cfg.kmeans_iters, cfg.seed + i) for i, (k, v) in enumerate(kv)]
    t2 = time.perf_counter()
    _calibrate_all(engine, layers, window_q)
    t3 = time.perf_counter()
    shift = torch.cumsum(~cut, 0)  # tokens removed at or before each position
    new_spans = [(s - int(shift[s - 1]) if s else 0, e - int(shift[e - 1]))
                 for j, (s, e) in enumerate(spans) if j not in drop]
    seconds = {"prefill": t1 - t0, "clustering": t2 - t1, "calibration": t3 - t2, "reclustered": 1.0}
    return CorpusKV(keep_ids, layers, tuple(cfg.keep_ladder), seconds), new_spans
