"""The squeezed path against plain Hugging Face attention, on tiny random Llama/Qwen2 models and SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sqattn_index.config import SqueezeConfig
from sqattn_index.engine import SqueezedEngine
from sqattn_index.errors import ConfigError, ContextTooLongError, UnsupportedModelError
from sqattn_index.hf_attention import SqueezedCache
from sqattn_index.model_loading import check_supported, load_local_model
from sqattn_index.selection import SelectionSpec

QUESTION = "What is the access code for the Amber vault?"
FACT = "The access code for the Amber vault is 4821."


def _dense_reference(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def _squeezed_logits(engine, corpus, ids, keep=1.0):
    cache = SqueezedCache(corpus, SelectionSpec(keep), engine.ops)
    return engine._forward(cache, ids, corpus.num_tokens, logits_to_keep=len(ids)), cache


@pytest.fixture(scope="module")
def smol_engine(smol, filler):
    engine = SqueezedEngine(smol, SqueezeConfig())
    corpus, spans = engine.build_corpus(filler(10, FACT))
    return engine, corpus, spans


@pytest.mark.parametrize("which", [pytest.param("tiny_llama_dir", id="tiny-llama-gqa"),
                                   pytest.param("tiny_qwen_dir", id="tiny-qwen2-gqa")])
def test_keep_one_matches_hf_logits_and_greedy_tokens(which, request, filler):
    folder = request.getfixturevalue(which)
    local = load_local_model(folder, device="cpu", dtype=torch.float32, progress=False)
    assert local.num_q_heads != local.num_kv_heads  # grouped-query attention is exercised
    engine = SqueezedEngine(local, SqueezeConfig(keys_per_fine=8, fine_per_coarse=4, window_tokens=16,
                                                 prefill_chunk=100))
    corpus, _ = engine.build_corpus(filler(4, FACT, at=2))
    suffix = engine.layout.suffix_ids(QUESTION)
    ours, cache = _squeezed_logits(engine, corpus, suffix)
    ref = _dense_reference(folder)
    full = torch.cat([corpus.input_ids, suffix]).unsqueeze(0)
    with torch.no_grad():
        theirs = ref(full).logits[0, -len(suffix):]
    assert (ours - theirs).abs().max().item() < 1e-3
    assert cache.kv_budget == pytest.approx(1.0)
    # Multi-token greedy decoding equals Hugging Face generate on the whole prompt.
    answer = engine.answer(corpus, QUESTION, keep=1.0, max_new_tokens=8)
    with torch.no_grad():
        gen = ref.generate(full, max_new_tokens=8, do_sample=False, eos_token_id=list(engine.eos_ids),
                           pad_token_id=0)[0, full.shape[1]:].tolist()
    gen = [t for t in gen if t not in engine.eos_ids][: len(answer.token_ids)] if answer.finish_reason == "eos" else gen
    assert answer.token_ids == gen[: len(answer.token_ids)] and len(answer.token_ids) >= min(len(gen), 1)


def test_smollm2_keep_one_matches_hf(smol_engine, smol_dir):
    engine, corpus, _ = smol_engine
    suffix = engine.layout.suffix_ids(QUESTION)
    ours, _ = _squeezed_logits(engine, corpus, suffix)
    ref = _dense_reference(str(smol_dir))
    full = torch.cat([corpus.input_ids, suffix]).unsqueeze(0)
    with torch.no_grad():
        theirs = ref(full).logits[0, -len(suffix):]
        gen = ref.generate(full, max_new_tokens=16, do_sample=False)[0, full.shape[1]:].tolist()
    assert (ours - theirs).abs().max().item() < 1e-3
    answer = engine.answer(corpus, QUESTION, keep=1.0, max_new_tokens=16)
    assert answer.token_ids == [t for t in gen if t not in engine.eos_ids][: len(answer.token_ids)]
    assert len(answer.token_ids) >= 5
    assert "4821" in answer.text


def test_smollm2_sparse_answers_and_budget(smol_engine):
    engine, corpus, spans = smol_engine
    answer = engine.answer(corpus, QUESTION, keep=0.2, max_new_tokens=16, spans=spans)
    assert "4821" in answer.text
    assert 0.0 < answer.kv_budget < 0.3  # kept K/V plus centroids, far below dense
    assert len(answer.node_mass) == len(spans)
    assert answer.seconds["ttft"] > 0


def test_budget_mode_keeps_requested_fraction(smol_engine):
    engine, corpus, _ = smol_engine
    spec = SelectionSpec(keep=0.2, mode="budget", hierarchical=True)
    cache = SqueezedCache(corpus, spec, engine.ops)
    engine._forward(cache, engine.layout.suffix_ids(QUESTION), corpus.num_tokens)
    # Kept tokens are 20% of the context to within one cluster per head; centroids add a few percent.
    assert 0.2 <= cache.kv_budget <= 0.2 + 0.06


def test_sampling_is_seeded(smol_engine):
    engine, corpus, _ = smol_engine
    a = engine.answer(corpus, QUESTION, keep=0.3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    b = engine.answer(corpus, QUESTION, keep=0.3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids


def test_stream_yields_the_answer_text(smol_engine):
    engine, corpus, _ = smol_engine
    stream = engine.stream(corpus, QUESTION, keep=0.2, max_new_tokens=10)
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.answer.text
    assert len(pieces) >= 2


def test_score_prefers_the_planted_answer(smol_engine):
    engine, corpus, _ = smol_engine
    good = engine.score(corpus, QUESTION, "The access code is 4821.", keep=0.2)
    bad = engine.score(corpus, QUESTION, "The access code is 7390.", keep=0.2)
    assert good.logprob_sum > bad.logprob_sum
    assert good.num_tokens > 3 and 0 < good.kv_budget < 0.5


def test_errors_are_clear(smol_engine, smol):
    engine, corpus, _ = smol_engine
    with pytest.raises(ConfigError, match="keep must lie in"):
        engine.answer(corpus, QUESTION, keep=1.5)
    with pytest.raises(ConfigError, match="non-empty string"):
        engine.answer(corpus, "  ", keep=0.5)
    with pytest.raises(ContextTooLongError, match="exceeds the model's 8192 positions"):
        engine.answer(corpus, QUESTION, keep=0.5, max_new_tokens=9000)
    too_long = torch.zeros(9000, dtype=torch.long)
    from sqattn_index.kv_capture import capture_kv

    with pytest.raises(ContextTooLongError, match="9000 tokens.*8192 positions"):
        capture_kv(smol, too_long)


def test_unsupported_model_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama"):
        check_supported(model)


def test_smollm2_calibration_on_observation_window(smol_engine):
    from sqattn_index.calibration import measured_keep_fraction
    from sqattn_index.kv_capture import capture_kv

    engine, corpus, _ = smol_engine
    window_q = capture_kv(engine.local, corpus.input_ids, window=engine.config.window_tokens).window_queries
    for li in (0, 7, 15, 29):
        layer = corpus.layers[li]
        assert torch.isfinite(layer.thresholds).all() and torch.isfinite(layer.coarse_thresholds).all()
        s, e = layer.clustered_range
        for i, keep in enumerate(corpus.keep_ladder):
            target = max(keep * layer.num_tokens - (layer.num_tokens - (e - s)), 0) / (e - s)
            got = measured_keep_fraction(layer, window_q[li], i, engine.scale)
            assert abs(got - target) <= 0.05, (li, keep, target, got)
