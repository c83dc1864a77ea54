"""Squeezed attention inside Hugging Face models, with no fork of model code.

``install_attention(model)`` registers the attention function ``"sqattn"`` through
``transformers.AttentionInterface`` and switches the model to it. The function is dense causal attention
(with a query-capture hook used while building an index) unless a ``SqueezedCache`` is active for the
running forward pass; then every layer attends sparsely over the kept ranges of its fixed-context KV plus
densely and causally over the new (question and generated) tokens, merged by log-sum-exp.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

from .corpus_kv import CorpusKV
from .kernels.reference import ranges_to_index_ref, slotted_causal_attention_ref
from .selection import SelectionSpec, centroid_bytes, select_positions, select_ranges

__all__ = ["ATTN_NAME", "install_attention", "SqueezedCache", "QueryCapture", "active_cache", "capturing",
           "StaticNewTokens"]

ATTN_NAME = "sqattn"
_ACTIVE: ContextVar = ContextVar("sqattn_active_cache", default=None)
_CAPTURE: ContextVar = ContextVar("sqattn_query_capture", default=None)


class QueryCapture:
    """Keeps the last ``window`` post-RoPE queries [Hq, W, D] of every layer seen during a prefill."""

    def __init__(self, window: int):
        self.window = window
        self.queries: dict[int, torch.Tensor] = {}

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        q = query[0].detach()  # [Hq, T, D]
        prev = self.queries.get(layer_idx)
        if prev is not None and q.shape[1] < self.window:
            q = torch.cat([prev, q], dim=1)
        self.queries[layer_idx] = q[:, -self.window:].clone() if self.window else q[:, :0].clone()


@contextlib.contextmanager
def capturing(capture: QueryCapture):
    token = _CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CAPTURE.reset(token)


@contextlib.contextmanager
def active_cache(cache: "SqueezedCache"):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def dense_causal_attention(query, key, value, scale):
    """Causal attention of T queries at the end of M keys. query [B, Hq, T, D], key/value [B, Hk, M, D]."""
    t, m = query.shape[2], key.shape[2]
    mask = None
    if 1 < t < m:
        qpos = torch.arange(m - t, m, device=query.device).view(t, 1)
        mask = torch.arange(m, device=query.device).view(1, m) <= qpos
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=(t == m and t > 1),
                                          scale=scale, enable_gqa=key.shape[1] != query.shape[1])


def sqattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. query [B, Hq, T, D]; key/value [B, Hk, M, D] (new tokens only
    while a SqueezedCache is active). Returns ([B, T, Hq, D], None)."""
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    cache = _ACTIVE.get()
    if cache is not None:
        out = cache.attend(module.layer_idx, query, key, value, scale).to(query.dtype)
    else:
        capture = _CAPTURE.get()
        if capture is not None:
            capture.record(module.layer_idx, query)
        out = dense_causal_attention(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


def install_attention(model: torch.nn.Module) -> None:
    """Register ``"sqattn"`` and switch ``model`` to it (idempotent)."""
    AttentionInterface.register(ATTN_NAME, sqattn_attention)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


class SqueezedLayer(DynamicLayer):
    """Holds the new tokens' K/V; reports the fixed context's length too, so positions continue at N."""

    def __init__(self, fixed_len: int):
        super().__init__()
        self.fixed_len = fixed_len

    def get_seq_length(self) -> int:
        return self.fixed_len + super().get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0


class StaticNewTokens(SqueezedLayer):
    """New tokens' K/V in preallocated buffers [B, Hk, capacity, D]: fixed addresses and shapes, so a decode
    step can be captured in a CUDA graph. ``slots`` [T] (int64, on the device, owned by the cache) says where
    the forward's T new tokens go; ``update`` returns the whole buffers (entries past a query's slot are
    masked by ``slotted_causal_attention_ref`` or the Triton epilogue)."""

    def __init__(self, fixed_len: int, capacity: int, cache: "SqueezedCache"):
        super().__init__(fixed_len)
        self.capacity = capacity
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hk, _, d = key_states.shape
        self.keys = torch.zeros(b, hk, self.capacity, d, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, hk, self.capacity, value_states.shape[-1], dtype=value_states.dtype,
                                  device=value_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self._cache.slots
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.fixed_len + self._cache.new_tokens


def flash_fixed_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Dense attention of query [B, Hq, T, D] over the whole fixed context keys/values [Hk, N, D] through
    PyTorch's FlashAttention op (CUDA, 16-bit): the dense baseline of the CUDA-graph benchmark. A KV head's G
    query heads ride as G*T query rows. Returns out [B, Hk, 1, G*T, D] (query dtype) and lse [B, Hk, 1, G*T]
    float32: one partial for ``fused_attention.merge_with_new_tokens``."""
    b, hq, t, d = query.shape
    hk = keys.shape[0]
    q = query.contiguous().reshape(b, hk, (hq // hk) * t, d)  # a KV head's G query heads as G*T rows
    k = keys.unsqueeze(0).expand(b, *keys.shape)
    v = values.unsqueeze(0).expand(b, *values.shape)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0].unsqueeze(2), res[1].unsqueeze(2)


def _token_bytes(layer) -> int:
    """Bytes of one fixed-context token's K and V in one KV head."""
    return 2 * layer.head_dim * layer.keys.element_size()


def _per_head(query: torch.Tensor, layer) -> int:
    """Grouped queries per KV head of a lookup over query [B, Hq, T, D]."""
    return (query.shape[1] // layer.num_kv_heads) * query.shape[2]


class SqueezedCache(Cache):
    """A transformers ``Cache`` over a precomputed ``CorpusKV``: fixed KV read sparsely, new tokens densely.

    ``stats`` accumulates bytes of fixed-context K/V and centroids read versus dense, over all layers and steps.
    With ``collect_mass`` set, the next forward adds each fixed token's attention probability (averaged over
    layers, heads and query tokens) to ``mass`` [N] (original token order).
    """

    def __init__(self, corpus: CorpusKV, spec: SelectionSpec, ops, capacity: int | None = None):
        """``capacity``: hold the new tokens in static buffers of that many tokens (``StaticNewTokens``; needed
        for CUDA-graph decoding, see ``graph_decode``); each forward then needs ``set_slots`` first."""
        if capacity is not None:
            super().__init__(layers=[StaticNewTokens(corpus.num_tokens, capacity, self) for _ in corpus.layers])
        else:
            super().__init__(layers=[SqueezedLayer(corpus.num_tokens) for _ in corpus.layers])
        self.corpus = corpus
        self.spec = spec
        self.ops = ops
        self.capacity = capacity
        self.dense_backend = "kernel"  # "flash": keep=1.0 on CUDA attends the fixed context with FlashAttention
        self.slots: torch.Tensor | None = None
        self.new_tokens = 0
        dev = corpus.layers[0].keys.device if corpus.layers else "cpu"
        self._bytes = torch.zeros(2, dtype=torch.int64, device=dev)  # read, dense: in place (graph-safe)
        self.collect_mass = False
        self.per_token = False
        self.mass = None
        self._mass_terms = 0

    def set_slots(self, start: int, count: int) -> None:
        """Static mode: the next forward's ``count`` new tokens go to buffer slots start .. start + count."""
        if self.capacity is None:
            raise RuntimeError("set_slots needs a SqueezedCache built with capacity=...")
        if start + count > self.capacity:
            raise ValueError(f"new tokens {start}..{start + count} exceed the cache capacity {self.capacity}; "
                             "build the cache with a larger capacity.")
        self.slots = torch.arange(start, start + count, device=self._bytes.device)
        self.new_tokens = start + count

    @property
    def kv_budget(self) -> float:
        read, dense = self._bytes.tolist()
        return read / dense if dense else 0.0

    def _count(self, layer, rows: int, read=None) -> None:
        """Add ``read`` bytes (None: all of the fixed K/V), and the dense bytes of ``rows`` selections over
        ``layer``, to the KV budget."""
        dense = rows * layer.num_kv_heads * layer.num_tokens * _token_bytes(layer)
        self._bytes[0] += dense if read is None else read
        self._bytes[1] += dense

    def _new_token_attention(self, query, key, value, scale):
        if self.capacity is not None:
            return slotted_causal_attention_ref(query, key, value, self.slots, scale)
        return self.ops.causal_attention(query, key, value, scale)

    def attend(self, layer_idx: int, query, key, value, scale) -> torch.Tensor:
        """query [B, Hq, T, D]; key/value [B, Hk, M, D] new tokens. Returns [B, Hq, T, D] float32 (the Triton
        path: the query's dtype).

        With ``per_token`` set (and B == 1), each of the T tokens selects its own clusters, exactly as T
        decode steps would; otherwise the T tokens share one selection (scores averaged over them).
        """
        layer = self.corpus.layers[layer_idx]
        if self.spec.dense and self.dense_backend == "flash":  # the benchmark's dense baseline (CUDA)
            from .kernels.fused_attention import merge_with_new_tokens

            self._count(layer, query.shape[0])
            part_o, part_l = flash_fixed_attention(query, layer.keys, layer.values, scale)
            return merge_with_new_tokens(part_o, part_l, query, key, value, self._slots_for(query, key), scale,
                                         out=self._output(query))[0]
        split = self.per_token and query.shape[0] == 1 and query.shape[2] > 1 and not self.spec.dense
        if getattr(self.ops, "backend", "torch") == "triton" and not split and not self.collect_mass:
            return self._attend_positions(layer, query, key, value, scale)
        q_sel = query[0].transpose(0, 1).unsqueeze(2) if split else query  # [T, Hq, 1, D] when split
        sel = select_ranges(layer, q_sel, self.spec, self.ops, scale)
        self._count(layer, q_sel.shape[0],
                    sel.tokens_read * _token_bytes(layer)
                    + sel.centroids_read * centroid_bytes(layer, self.spec, _per_head(q_sel, layer)))
        out_f, lse_f = self.ops.sparse_attention(q_sel, layer.keys, layer.values, sel.starts, sel.ends,
                                                 sel.counts, scale)
        if split:
            out_f = out_f[:, :, 0].transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
            lse_f = lse_f[:, :, 0].transpose(0, 1).unsqueeze(0)
        out_d, lse_d = self._new_token_attention(query, key, value, scale)
        out, lse = self.ops.lse_merge(out_f, lse_f, out_d, lse_d)
        if self.collect_mass:
            lse_sel = lse[0].transpose(0, 1).unsqueeze(-1) if split else lse  # q_sel layout: [rows, Hq, T']
            self._add_mass(layer, q_sel, sel, lse_sel, scale)
        return out

    def _attend_positions(self, layer, query, key, value, scale) -> torch.Tensor:
        """Triton path with no host sync: lookup straight to kept positions (the positions kernel also adds
        to the KV budget), then split-K attention whose epilogue merges the new tokens' causal attention
        and writes the output in the query's dtype, laid out as ``[B, T, Hq, D]`` (returned as a
        ``[B, Hq, T, D]`` view)."""
        from .kernels.fused_attention import sparse_attention_with_new_tokens

        token_bytes = _token_bytes(layer)
        counter = (self._bytes, token_bytes, centroid_bytes(layer, self.spec, _per_head(query, layer)),
                   layer.num_tokens * token_bytes)
        pos, total = select_positions(layer, query, self.spec, scale, counter=counter)
        if self.spec.dense:
            self._count(layer, query.shape[0])
        return sparse_attention_with_new_tokens(query, layer.keys, layer.values, pos, total, key, value,
                                                self._slots_for(query, key), scale, out=self._output(query))[0]

    def _slots_for(self, query, key) -> torch.Tensor:
        """[T] last buffer entry each new query sees: the static slots, or the tail of a growing cache."""
        if self.capacity is not None:
            return self.slots
        m, t = key.shape[2], query.shape[2]
        return torch.arange(m - t, m, device=query.device)

    @staticmethod
    def _output(query) -> torch.Tensor:
        """[B, Hq, T, D] view of a [B, T, Hq, D] buffer in the query's dtype: what HF's attention returns."""
        b, hq, t, d = query.shape
        return torch.empty(b, t, hq, d, dtype=query.dtype, device=query.device).transpose(1, 2)

    def _add_mass(self, layer, q_sel, sel, lse_sel, scale) -> None:
        """Add each kept key's attention probability to ``mass`` (original order).

        q_sel [R, Hq, T', D] and lse_sel [R, Hq, T'] in selection layout (R rows, each with its own ranges)."""
        if self.mass is None:
            self.mass = torch.zeros(layer.num_tokens, dtype=torch.float32, device=layer.keys.device)
        hk, g = layer.num_kv_heads, q_sel.shape[1] // layer.num_kv_heads
        for r in range(q_sel.shape[0]):
            for h in range(hk):
                c = int(sel.counts[r, h])
                if c == 0:
                    continue
                idx = ranges_to_index_ref(sel.starts[r, h, :c], sel.ends[r, h, :c])
                qh = q_sel[r, h * g:(h + 1) * g].float()  # [G, T', D]
                s = torch.matmul(qh, layer.keys[h].index_select(0, idx).float().t()) * scale  # [G, T', M]
                p = torch.exp(s - lse_sel[r, h * g:(h + 1) * g].unsqueeze(-1)).sum(dim=(0, 1))  # [M]
                self.mass.index_add_(0, layer.perm[h].index_select(0, idx), p)
        self._mass_terms += q_sel.shape[0] * q_sel.shape[1] * q_sel.shape[2]

    def normalised_mass(self) -> torch.Tensor | None:
        """Mean attention probability per fixed token [N] over the collected layers, heads and queries."""
        if self.mass is None or not self._mass_terms:
            return None
        return self.mass / self._mass_terms
