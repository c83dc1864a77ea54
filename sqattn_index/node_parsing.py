"""Default node parsing: LlamaIndex's ``SentenceSplitter`` counting tokens with the model's own tokenizer.

Chunks never overlap (``chunk_overlap=0``): the whole corpus is attended at once, so an overlap would only
store the same tokens twice. Each node's text is what the model reads (metadata stays on the node).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["HFTokenIds", "default_node_parser", "node_text", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 256  # tokens per node: the granularity of source attribution


class HFTokenIds:
    """``tokenizer(text) -> token ids`` (no special tokens) for a Hugging Face tokenizer; picklable."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _hf_tokenizer(source: Any) -> Any:
    """The Hugging Face tokenizer of a SqueezedLLM, a LocalModel or a tokenizer."""
    local = getattr(source, "local", None)  # SqueezedLLM
    if local is not None:
        return local.tokenizer
    tok = getattr(source, "tokenizer", None)  # LocalModel
    if tok is not None and callable(tok):
        return tok
    if callable(source):
        return source
    raise ConfigError(f"expected a SqueezedLLM, LocalModel or Hugging Face tokenizer; got {type(source).__name__}.")


def default_node_parser(source: Any, chunk_size: int = DEFAULT_CHUNK_SIZE, chunk_overlap: int = 0, **kwargs: Any):
    """A ``SentenceSplitter`` measuring chunks in the tokens of ``source`` (SqueezedLLM, LocalModel or tokenizer)."""
    from llama_index.core.node_parser import SentenceSplitter

    if not isinstance(chunk_size, int) or chunk_size < 8:
        raise ConfigError(f"chunk_size must be an int >= 8 tokens; got {chunk_size!r}.")
    if not isinstance(chunk_overlap, int) or not 0 <= chunk_overlap < chunk_size:
        raise ConfigError(f"chunk_overlap must be an int in [0, chunk_size); got {chunk_overlap!r}.")
    return SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                            tokenizer=HFTokenIds(_hf_tokenizer(source)), **kwargs)


def node_text(node: Any) -> str:
    """The text of ``node`` that enters the fixed context (its content, without metadata)."""
    from llama_index.core.schema import MetadataMode

    return node.get_content(metadata_mode=MetadataMode.NONE)
