"""Incremental insert and delete equal a from-scratch build (exact K/V; same answers and logits)."""

from __future__ import annotations

import pytest
import torch

from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.hf_attention import SqueezedCache
from sqattn_index.selection import SelectionSpec
from sqattn_index.updates import original_order

FACT = "The access code for the Amber vault is 4821."
QUESTION = "What is the access code for the Amber vault?"


def _logits(engine, corpus, keep=1.0):
    ids = engine.layout.suffix_ids(QUESTION)
    cache = SqueezedCache(corpus, SelectionSpec.from_config(keep, engine.config), engine.ops)
    return engine._forward(cache, ids, corpus.num_tokens, logits_to_keep=len(ids))


@pytest.fixture(scope="module")
def engine(smol):
    return SqueezedEngine(smol, SqueezeConfig(recluster_share=0.5))


def _same_kv(a, b):
    assert torch.equal(a.input_ids, b.input_ids)
    for la, lb in zip(a.layers, b.layers):
        ka, va = original_order(la)
        kb, vb = original_order(lb)
        assert (ka - kb).abs().max() < 1e-3 and (va - vb).abs().max() < 1e-3


def test_insert_equals_build_from_scratch(engine, filler):
    texts = filler(6)
    base, spans = engine.build_corpus(texts[:5])
    grown, spans2 = engine.append_texts(base, spans, [FACT, texts[5]])
    scratch, spans_s = engine.build_corpus(texts[:5] + [FACT, texts[5]])
    assert spans2 == spans_s
    assert grown.build_seconds["reclustered"] == 0.0  # incremental path: keys joined existing clusters
    for layer in grown.layers:
        layer.check()
    _same_kv(grown, scratch)
    assert (_logits(engine, grown) - _logits(engine, scratch)).abs().max() < 1e-3
    a = engine.answer(grown, QUESTION, keep=0.3, max_new_tokens=16)
    b = engine.answer(scratch, QUESTION, keep=0.3, max_new_tokens=16)
    assert "4821" in a.text and "4821" in b.text


def test_delete_equals_build_from_scratch(engine, filler):
    texts = filler(5, FACT, at=2)
    full, spans = engine.build_corpus(texts)
    for drop in ([0], [3], [5], [1, 4]):
        smaller, spans2 = engine.remove_texts(full, spans, drop)
        rest = [t for i, t in enumerate(texts) if i not in drop]
        scratch, spans_s = engine.build_corpus(rest)
        assert spans2 == spans_s, drop
        _same_kv(smaller, scratch)
        assert (_logits(engine, smaller) - _logits(engine, scratch)).abs().max() < 1e-3
    gone, _ = engine.remove_texts(full, spans, [2])
    assert "4821" not in engine.answer(gone, QUESTION, keep=1.0, max_new_tokens=16).text
