"""Prompt layout: the chat template split into a fixed prefix (instructions + documents) and a
per-question suffix (the question, any history, the generation prompt), on a clean token boundary.

The fixed prefix is built from separately tokenised pieces (template head, then each node's text and a
separator), so every node's token span is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

__all__ = ["PromptLayout", "FixedPrompt", "DEFAULT_INSTRUCTIONS"]

DEFAULT_INSTRUCTIONS = (
    "You answer questions about the documents the user gives you. Use only facts stated in the documents. "
    "Answer briefly."
)
_CONTEXT = "\u2063SQATTN_CONTEXT\u2063"
NODE_SEPARATOR = "\n\n"


@dataclass
class FixedPrompt:
    """Token ids of the fixed prefix [N] and the [start, end) token span of each node inside it."""

    input_ids: torch.Tensor
    spans: list[tuple[int, int]]


class PromptLayout:
    """Renders prompts for one tokenizer. ``chat`` layout when the tokenizer has a chat template, else plain."""

    def __init__(self, tokenizer, instructions: str = DEFAULT_INSTRUCTIONS, question_prefix: str = "Question: "):
        self.tokenizer = tokenizer
        self.instructions = instructions
        self.question_prefix = question_prefix
        self.kind = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        self.head_text = self._render_head()

    def settings(self) -> dict:
        return {"kind": self.kind, "instructions": self.instructions, "question_prefix": self.question_prefix,
                "node_separator": NODE_SEPARATOR}

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _messages(self, question: str, history: list[tuple[str, str]]) -> list[dict]:
        msgs = [{"role": "system", "content": self.instructions}]
        first = True
        for user, assistant in history:
            content = (_CONTEXT + NODE_SEPARATOR + self.question_prefix + user) if first else user
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": assistant}]
            first = False
        content = (_CONTEXT + NODE_SEPARATOR + self.question_prefix + question) if first else question
        msgs.append({"role": "user", "content": content})
        return msgs

    def _render(self, question: str, history: list[tuple[str, str]], reply: str | None = None) -> str:
        if self.kind == "plain":
            text = f"{self.instructions}\n\nDocuments:\n{_CONTEXT}"
            for user, assistant in history:
                text += f"{NODE_SEPARATOR}{self.question_prefix}{user}\nAnswer: {assistant}"
            text += f"{NODE_SEPARATOR}{self.question_prefix}{question}\nAnswer:"
            return text + (" " + reply if reply is not None else "")
        msgs = self._messages(question, history)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + (reply if reply is not None else "")

    def _render_head(self) -> str:
        text = self._render("q", [])
        if text.count(_CONTEXT) != 1:
            raise ConfigError("the chat template does not render the user message verbatim; use a plain layout.")
        return text.split(_CONTEXT)[0]

    def fixed_prompt(self, texts: list[str]) -> FixedPrompt:
        """Token ids of instructions + documents, with each text's span. ``texts`` in corpus order."""
        ids = self._encode(self.head_text)
        spans = []
        for i, text in enumerate(texts):
            piece = self._encode(text)
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
            if i + 1 < len(texts):
                ids += self._encode(NODE_SEPARATOR)
        return FixedPrompt(torch.tensor(ids, dtype=torch.long), spans)

    def suffix_text(self, question: str, history: list[tuple[str, str]] | None = None, reply: str | None = None) -> str:
        text = self._render(question, list(history or []), reply)
        return text.split(_CONTEXT, 1)[1]

    def suffix_ids(self, question: str, history: list[tuple[str, str]] | None = None) -> torch.Tensor:
        """Token ids [T] that follow the fixed prefix: separator, question (and history), generation prompt."""
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"a question must be a non-empty string; got {question!r}.")
        return torch.tensor(self._encode(self.suffix_text(question, history)), dtype=torch.long)

    def reply_ids(self, question: str, reply: str, history: list[tuple[str, str]] | None = None) -> torch.Tensor:
        """Token ids of ``reply`` as the assistant's answer, as they follow ``suffix_ids(question)``."""
        prompt = self._encode(self.suffix_text(question, history))
        full = self._encode(self.suffix_text(question, history, reply=reply))
        if full[: len(prompt)] != prompt:
            # The reply merged with the generation prompt's last token: encode it on its own instead.
            return torch.tensor(self._encode(reply), dtype=torch.long)
        return torch.tensor(full[len(prompt):], dtype=torch.long)

    def check_split(self, sample_context: str = "Some document text.", question: str = "What is it?") -> bool:
        """True when tokenising prefix and suffix apart equals tokenising the whole prompt."""
        head = self.head_text + sample_context
        tail = self.suffix_text(question)
        return self._encode(head) + self._encode(tail) == self._encode(head + tail)
