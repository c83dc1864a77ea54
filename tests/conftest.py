"""Shared fixtures: the embedded SmolLM2 model and tiny random Llama / Qwen2 models saved as local folders."""

from __future__ import annotations

import pytest
import torch

from sqattn_index.default_model import ensure_default_model
from sqattn_index.model_loading import load_local_model


@pytest.fixture(scope="session")
def smol_dir():
    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def smol(smol_dir):
    return load_local_model(str(smol_dir), device="cpu", dtype=torch.float32, progress=False)


def _save_tiny(tmp_root, kind: str, smol_dir) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smol_dir))
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(1234)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, head_dim=16))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    folder = tmp_root / f"tiny-{kind}"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_dir):
    return _save_tiny(tmp_path_factory.mktemp("models"), "llama", smol_dir)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, smol_dir):
    return _save_tiny(tmp_path_factory.mktemp("models"), "qwen2", smol_dir)


@pytest.fixture(scope="session")
def filler():
    """The ``filler_texts`` helper, as a fixture (test modules cannot import conftest in importlib mode)."""
    return filler_texts


def filler_texts(num: int = 10, fact: str | None = None, at: int = 4) -> list[str]:
    """Documents of plain prose; ``fact`` inserted as its own document at index ``at``."""
    topics = ["river", "market", "library", "harbor", "orchard", "bridge", "station", "garden", "mill", "tower"]
    texts = []
    for i in range(num):
        t = topics[i % len(topics)]
        texts.append(f"Chapter {i}. The {t} near the old town was quiet in the morning. Visitors walked past the "
                     f"{t} and talked about the season, the prices and the long road home. " * 3)
    if fact is not None:
        texts.insert(at, fact)
    return texts
