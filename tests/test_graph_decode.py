"""Static new-token buffers (the CUDA-graph decode path) against the growing cache, and the graph step itself."""

from __future__ import annotations

import pytest
import torch

from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.hf_attention import SqueezedCache
from sqattn_index.kernels.reference import causal_attention_ref, slotted_causal_attention_ref
from sqattn_index.model_loading import load_local_model
from sqattn_index.selection import SelectionSpec

FACT = "The access code for the Amber vault is 4821."
QUESTION = "What is the access code for the Amber vault?"


def test_slotted_attention_equals_causal_attention_on_the_filled_part():
    g = torch.Generator().manual_seed(0)
    b, hq, hk, t, d, cap = 1, 4, 2, 3, 16, 10
    keys = torch.randn(b, hk, cap, d, generator=g)
    values = torch.randn(b, hk, cap, d, generator=g)
    q = torch.randn(b, hq, t, d, generator=g)
    filled = 7  # entries 0..6 hold tokens; the T queries are tokens 4, 5, 6
    out, lse = slotted_causal_attention_ref(q, keys, values, torch.arange(filled - t, filled), 0.25)
    rout, rlse = causal_attention_ref(q, keys[:, :, :filled], values[:, :, :filled], 0.25)
    assert torch.allclose(out, rout, atol=1e-5) and torch.allclose(lse, rlse, atol=1e-5)
    keys[:, :, filled:] = 1e4  # garbage past the last slot changes nothing
    out2, _ = slotted_causal_attention_ref(q, keys, values, torch.arange(filled - t, filled), 0.25)
    assert torch.equal(out, out2)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, filler):
    local = load_local_model(tiny_llama_dir, device="cpu", dtype=torch.float32, progress=False)
    engine = SqueezedEngine(local, SqueezeConfig(keys_per_fine=8, fine_per_coarse=4, window_tokens=16,
                                                 prefill_chunk=100))
    corpus, _ = engine.build_corpus(filler(4, FACT, at=2))
    return engine, corpus


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_static_buffers_match_growing_cache(tiny, keep):
    """Question prefill + 5 one-token steps: same logits and KV budget with static buffers as without."""
    engine, corpus = tiny
    n = corpus.num_tokens
    suffix = engine.layout.suffix_ids(QUESTION)
    spec = SelectionSpec.from_config(keep, engine.config)
    grow = SqueezedCache(corpus, spec, engine.ops)
    grow.per_token = True
    static = SqueezedCache(corpus, spec, engine.ops, capacity=len(suffix) + 8)
    static.per_token = True
    static.set_slots(0, len(suffix))
    a = engine._forward(grow, suffix, n)
    b = engine._forward(static, suffix, n)
    assert (a - b).abs().max().item() < 1e-4
    tok = int(a[-1].argmax())
    for i in range(5):
        static.set_slots(len(suffix) + i, 1)
        ids = torch.tensor([tok])
        a = engine._forward(grow, ids, n + len(suffix) + i)
        b = engine._forward(static, ids, n + len(suffix) + i)
        assert (a - b).abs().max().item() < 1e-4
        tok = int(a[-1].argmax())
    assert static.kv_budget == pytest.approx(grow.kv_budget)


def test_static_cache_rejects_overflow(tiny):
    engine, corpus = tiny
    cache = SqueezedCache(corpus, SelectionSpec(1.0), engine.ops, capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        cache.set_slots(2, 3)


def test_graph_step_needs_static_cuda_cache(tiny):
    from sqattn_index.graph_decode import GraphDecodeStep

    engine, corpus = tiny
    with pytest.raises(ValueError, match="capacity"):
        GraphDecodeStep(engine.local.model, SqueezedCache(corpus, SelectionSpec(1.0), engine.ops), corpus.num_tokens)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecodeStep(engine.local.model, SqueezedCache(corpus, SelectionSpec(1.0), engine.ops, capacity=4),
                        corpus.num_tokens)


def test_static_buffers_collect_the_same_attention_mass(tiny):
    """The engine's CUDA path prefills the question into static buffers while collecting node mass."""
    engine, corpus = tiny
    n = corpus.num_tokens
    suffix = engine.layout.suffix_ids(QUESTION)
    masses = []
    for capacity in (None, len(suffix) + 4):
        cache = SqueezedCache(corpus, SelectionSpec.from_config(0.3, engine.config), engine.ops, capacity=capacity)
        cache.per_token = True
        cache.collect_mass = True
        if capacity is not None:
            cache.set_slots(0, len(suffix))
        engine._forward(cache, suffix, n)
        masses.append(cache.normalised_mass())
    assert torch.allclose(masses[0], masses[1], atol=1e-6)
    assert not engine.graphs_enabled(corpus)  # CPU: decode stays eager
