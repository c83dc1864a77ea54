"""Load a local Hugging Face causal LM (default model, hub id, local folder or .gguf) and check that its
attention can be squeezed: RoPE keys and the transformers attention interface."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelLoadError, UnsupportedModelError

__all__ = ["LocalModel", "load_local_model", "SUPPORTED_MODEL_TYPES"]

# Decoders whose attention modules compute RoPE keys and call transformers' ALL_ATTENTION_FUNCTIONS.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite")


@dataclass
class LocalModel:
    """A loaded causal LM and its tokenizer, with the fingerprints an index records."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def num_q_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def max_positions(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    def model_fingerprint(self) -> str:
        """sha256 over the config and a strided sample of every weight (cheap, changes with any retraining)."""
        if getattr(self, "_model_fp", None) is None:
            digest = hashlib.sha256()
            cfg = self.config.to_dict()
            for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation",
                        "_attn_implementation_autoset", "quantization_config", "use_cache"):
                cfg.pop(key, None)
            digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            for name, param in sorted(self.model.state_dict().items()):
                flat = param.detach().reshape(-1)
                step = max(1, flat.numel() // 4096)
                sample = flat[::step][:4096].to(device="cpu", dtype=torch.float32).contiguous()
                digest.update(name.encode() + str(tuple(param.shape)).encode())
                digest.update(sample.numpy().round(4).tobytes())
            self._model_fp = digest.hexdigest()
        return self._model_fp

    def tokenizer_fingerprint(self) -> str:
        """sha256 over the tokenizer's vocabulary/merges and its chat template."""
        if getattr(self, "_tok_fp", None) is None:
            digest = hashlib.sha256()
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:
                digest.update(backend.to_str().encode())
            else:
                digest.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
            digest.update((getattr(self.tokenizer, "chat_template", None) or "").encode())
            self._tok_fp = digest.hexdigest()
        return self._tok_fp


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be like 'cpu', 'cuda' or 'cuda:1'; got {device!r}.") from None


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype) not in names:
        raise ConfigError(f"dtype must be one of {sorted(names)} or a torch.dtype; got {dtype!r}.")
    return names[str(dtype)]


def check_supported(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError unless the model is a RoPE decoder using the attention interface."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "?")
    has_rope = any("rotary" in name for name, _ in model.named_modules())
    if model_type not in SUPPORTED_MODEL_TYPES or not has_rope:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: squeezed attention needs a RoPE decoder that calls "
            f"transformers' attention interface; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )


def load_local_model(model: str | os.PathLike | None = None, device=None, dtype=None,
                     progress: bool = True) -> LocalModel:
    """Load ``model`` (None = embedded default SmolLM2-135M-Instruct; a hub id; a local folder; a .gguf file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf_attention import install_attention

    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    kwargs = {}
    if model is None:
        from .default_model import DEFAULT_MODEL_ID, ensure_default_model

        source, model_id = str(ensure_default_model(progress=progress)), DEFAULT_MODEL_ID
    else:
        source = model_id = str(model)
        if source.endswith(".gguf"):
            path = Path(source)
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {source} does not exist; give the path of an existing .gguf file.")
            source, kwargs = str(path.parent), {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model {model_id!r}: {first}. Give a local folder with config.json and weights, a .gguf "
            "file, or a hub id with network access (HF_HUB_OFFLINE=1 allows only cached ids)."
        ) from exc
    check_supported(hf_model)
    hf_model.to(dev).eval()
    install_attention(hf_model)
    return LocalModel(model=hf_model, tokenizer=tokenizer, model_id=model_id, device=dev, dtype=dt)
