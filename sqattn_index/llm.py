"""``SqueezedLLM``: a local Hugging Face causal LM as a LlamaIndex ``CustomLLM``.

Unbound, it is an ordinary local chat model: prompts are rendered with the tokenizer's chat template and
decoded densely (usable as ``Settings.llm``, in ``RetrieverQueryEngine`` and so on). Bound to a squeezed
index (``llm.bind(index)``), ``complete`` and ``chat`` answer over the index's cached corpus, attending
sparsely to its precomputed KV instead of reading context from the prompt.

    llm = SqueezedLLM.from_pretrained()               # embedded default model (SmolLM2-135M-Instruct)
    llm.complete("Say hi.")                            # dense, no corpus
    llm.bind(index, keep=0.1).complete("Who ...?")     # over the index's cached KV
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseGen, CompletionResponse,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from .config import SqueezeConfig, check_keep
from .engine import SqueezedEngine
from .errors import ConfigError, ContextTooLongError
from .model_loading import LocalModel, load_local_model

__all__ = ["SqueezedLLM", "messages_to_turns"]


def messages_to_turns(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """Split chat ``messages`` into (last user message, earlier (user, assistant) pairs).

    System messages are dropped (a squeezed prompt has its own instructions); consecutive messages of one
    role are joined. Raises ConfigError when the last message is not the user's.
    """
    turns: list[list[str]] = []  # [user, assistant] pairs being collected
    for msg in messages:
        role, text = msg.role, msg.content or ""
        if role == MessageRole.USER:
            if turns and turns[-1][1] == "":
                turns[-1][0] = (turns[-1][0] + "\n" + text).strip()
            else:
                turns.append([text, ""])
        elif role in (MessageRole.ASSISTANT, MessageRole.CHATBOT, MessageRole.MODEL):
            if not turns:
                turns.append(["", ""])
            turns[-1][1] = (turns[-1][1] + "\n" + text).strip()
    if not turns or turns[-1][1] != "" or not turns[-1][0].strip():
        raise ConfigError("a chat over the squeezed corpus needs the last message to be a non-empty user message.")
    question = turns[-1][0]
    return question, [(u, a) for u, a in turns[:-1]]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        sorted_p[sorted_p.cumsum(-1) - sorted_p > top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class SqueezedLLM(CustomLLM):
    """A local causal LM that answers densely, or over a squeezed index's cached KV once bound to it."""

    model_name: str = Field(default="", description="Model id or path the weights were loaded from.")
    max_new_tokens: int = Field(default=256, gt=0, description="Most tokens generated per reply.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (temperature > 0).")
    seed: Optional[int] = Field(default=None, description="Sampling seed (temperature > 0).")
    keep: float = Field(default=0.1, gt=0.0, le=1.0,
                        description="Fraction of the corpus KV attended when bound to an index (1.0 = dense).")

    _local: LocalModel = PrivateAttr()
    _engine: SqueezedEngine = PrivateAttr()
    _store: Any = PrivateAttr(default=None)

    def __init__(self, local: LocalModel, config: SqueezeConfig | None = None, **kwargs: Any):
        """Wrap an already loaded ``LocalModel``; most callers use ``from_pretrained``."""
        if not isinstance(local, LocalModel):
            raise ConfigError(f"SqueezedLLM needs a LocalModel; got {type(local).__name__}. "
                              "Use SqueezedLLM.from_pretrained(model) to load one.")
        kwargs.setdefault("model_name", local.model_id)
        super().__init__(**kwargs)
        self._local = local
        self._engine = SqueezedEngine(local, config)

    @classmethod
    def from_pretrained(cls, model: str | LocalModel | None = None, device=None, dtype=None,
                        config: SqueezeConfig | None = None, progress: bool = False, **kwargs: Any) -> "SqueezedLLM":
        """Load ``model``: None = embedded default model, a hub id, a local folder, a .gguf path, or a LocalModel.

        ``config`` sets how indexes built with this LLM are squeezed; ``kwargs`` set fields such as
        ``max_new_tokens``, ``temperature`` or ``keep``.
        """
        local = model if isinstance(model, LocalModel) else load_local_model(model, device, dtype, progress)
        return cls(local, config, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "SqueezedLLM"

    # ----------------------------------------------------------------------------------------- accessors
    @property
    def local(self) -> LocalModel:
        """The loaded model and tokenizer."""
        return self._local

    @property
    def engine(self) -> SqueezedEngine:
        """The engine that builds and answers over squeezed corpora with this model."""
        return self._engine

    @property
    def config(self) -> SqueezeConfig:
        return self._engine.config

    @property
    def store(self):
        """The ``SqueezedKVStore`` this LLM is bound to, or None."""
        return self._store

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._local.max_positions, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name)

    def bind(self, target: Any, keep: float | None = None) -> "SqueezedLLM":
        """A copy of this LLM (same weights) that answers over ``target``'s cached corpus.

        ``target``: a ``SqueezedKVIndex`` or ``SqueezedKVStore``; ``keep``: fraction of its KV attended."""
        from .vector_store import SqueezedKVStore

        store = getattr(target, "vector_store", target)
        if not isinstance(store, SqueezedKVStore):
            raise ConfigError(f"bind() needs a SqueezedKVIndex or SqueezedKVStore; got {type(target).__name__}.")
        store.attach_llm(self)
        bound = self.model_copy(update={"keep": check_keep(self.keep if keep is None else keep)})
        bound._local, bound._engine, bound._store = self._local, self._engine, store
        return bound

    def unbind(self) -> "SqueezedLLM":
        """A copy of this LLM that generates densely without a corpus."""
        free = self.model_copy()
        free._local, free._engine, free._store = self._local, self._engine, None
        return free

    # ------------------------------------------------------------------------------------- generation
    def _settings(self, kwargs: dict) -> dict:
        out = {"max_new_tokens": int(kwargs.pop("max_new_tokens", self.max_new_tokens)),
               "temperature": float(kwargs.pop("temperature", self.temperature)),
               "top_p": float(kwargs.pop("top_p", self.top_p)), "seed": kwargs.pop("seed", self.seed)}
        if out["max_new_tokens"] < 1:
            raise ConfigError(f"max_new_tokens must be >= 1; got {out['max_new_tokens']}.")
        return out

    def _template_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        tok = self._local.tokenizer
        msgs = [{"role": str(m.role.value if hasattr(m.role, "value") else m.role), "content": m.content or ""}
                for m in messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return list(tok(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _dense_deltas(self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float,
                      seed: int | None) -> Iterator[str]:
        """Dense decoding of prompt ``ids``; yields text deltas."""
        local, tok = self._local, self._local.tokenizer
        if len(ids) + max_new_tokens > local.max_positions:
            raise ContextTooLongError(f"prompt ({len(ids)} tokens) + up to {max_new_tokens} new tokens exceeds the "
                                      f"model's {local.max_positions} positions; shorten the prompt.")
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        out = local.model(input_ids=torch.tensor([ids], device=local.device), use_cache=True, logits_to_keep=1)
        cache, new, text = out.past_key_values, [], ""
        for step in range(max_new_tokens):
            nxt = _pick(out.logits[0, -1], temperature, top_p, gen)
            if nxt in self._engine.eos_ids:
                break
            new.append(nxt)
            decoded = tok.decode(new, skip_special_tokens=True)
            if not decoded.endswith("\ufffd") and len(decoded) > len(text):
                yield decoded[len(text):]
                text = decoded
            if step + 1 < max_new_tokens:
                out = local.model(input_ids=torch.tensor([[nxt]], device=local.device), past_key_values=cache,
                                  use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
        final = tok.decode(new, skip_special_tokens=True)
        if len(final) > len(text):
            yield final[len(text):]

    def _deltas(self, messages: Sequence[ChatMessage], kwargs: dict) -> Iterator[str]:
        s = self._settings(kwargs)
        if self._store is None:
            if self.system_prompt and not any(m.role == MessageRole.SYSTEM for m in messages):
                messages = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt), *messages]
            return self._dense_deltas(self._template_ids(messages), **s)
        question, history = messages_to_turns(messages)
        self._store.require_corpus()
        snap = self._store.snapshot()  # one version for the whole reply
        return iter(snap.engine.stream(snap.require_corpus(), question, keep=self.keep, history=history, **s))

    @staticmethod
    def _completion_stream(deltas: Iterator[str]) -> CompletionResponseGen:
        text = ""
        for delta in deltas:
            text += delta
            yield CompletionResponse(text=text, delta=delta)

    @staticmethod
    def _chat_stream(deltas: Iterator[str]) -> ChatResponseGen:
        text = ""
        for delta in deltas:
            text += delta
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Reply to ``prompt`` as a user message (over the bound corpus, if any)."""
        text = "".join(self._deltas([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)).strip()
        return CompletionResponse(text=text)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completion_stream(self._deltas([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply to the conversation ``messages`` (over the bound corpus, if any)."""
        text = "".join(self._deltas(messages, kwargs)).strip()
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream(self._deltas(messages, kwargs))
