"""Plain records of a persisted index: the manifest, the source documents and the nodes.

These are what ``persist_index`` writes to the metadata database and what ``load_index_files``
returns next to the ``CorpusKV``. They hold only JSON-compatible values, so the database can be
SQLite (default) or any SQLAlchemy URL.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from sqattn_index.corpus_kv import CorpusKV
from sqattn_index.errors import ConfigError

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "IndexManifest",
    "DocumentRecord",
    "NodeRecord",
    "manifest_from_corpus",
]

FORMAT_VERSION = 1  # written by this code
SUPPORTED_FORMAT_VERSIONS = (1,)  # readable by this code


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class IndexManifest:
    """Everything about an index except its tensors, documents and nodes.

    Shapes: ``num_layers`` decoder layers, each with ``num_kv_heads`` KV heads of ``head_dim``
    over ``num_tokens`` fixed-context tokens; ``dtype`` is the K/V dtype name (e.g. ``"bfloat16"``).
    ``config`` is ``SqueezeConfig.to_dict()``; ``layout`` the prompt-layout settings (free-form JSON);
    ``extra`` anything else (``persist_index`` adds ``extra["build_seconds"]``).
    ``format_version`` is set by ``persist_index`` to the version it writes.
    """

    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    sink_tokens: int
    window_tokens: int
    keep_ladder: tuple[float, ...] = ()
    config: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    created_at: str = field(default_factory=_utc_now)

    def __post_init__(self) -> None:
        self.keep_ladder = tuple(float(k) for k in self.keep_ladder)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["keep_ladder"] = list(self.keep_ladder)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexManifest":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class DocumentRecord:
    """One source document: its id, metadata, sha256 of its text, and its token span [start, end)
    in the fixed context (0-based token positions of ``CorpusKV.input_ids``)."""

    ref_doc_id: str
    metadata: dict = field(default_factory=dict)
    text_hash: str = ""
    token_start: int = 0
    token_end: int = 0


@dataclass
class NodeRecord:
    """One node (text chunk) of the corpus: text, metadata, token span [start, end) in the fixed
    context, and ``position`` = its order in the corpus (0, 1, ...)."""

    node_id: str
    ref_doc_id: str | None
    text: str
    metadata: dict = field(default_factory=dict)
    token_start: int = 0
    token_end: int = 0
    position: int = 0


def manifest_from_corpus(
    corpus: CorpusKV,
    *,
    model_id: str,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    config: dict | None = None,
    layout: dict | None = None,
    extra: dict | None = None,
) -> IndexManifest:
    """An ``IndexManifest`` whose shape fields (layers, heads, dims, tokens, sinks, window,
    keep ladder, dtype) are read from ``corpus``."""
    if not corpus.layers:
        raise ConfigError("corpus has no layers; expected one LayerKV per decoder layer.")
    first = corpus.layers[0]
    return IndexManifest(
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint,
        dtype=str(first.keys.dtype).removeprefix("torch."),
        num_layers=corpus.num_layers,
        num_kv_heads=first.num_kv_heads,
        head_dim=first.head_dim,
        num_tokens=corpus.num_tokens,
        sink_tokens=first.sink_tokens,
        window_tokens=first.window_tokens,
        keep_ladder=tuple(corpus.keep_ladder),
        config=dict(config or {}),
        layout=dict(layout or {}),
        extra=dict(extra or {}),
    )


def json_normalized(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (tuples become lists, keys strings), as the database returns it.

    Raises ConfigError when ``value`` is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{what} must be JSON-serialisable (str, int, float, bool, None, lists, dicts); got {exc}. "
            "Convert such values to strings before persisting."
        ) from None
