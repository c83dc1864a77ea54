"""One configuration dataclass for building and querying a squeezed KV index."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError

__all__ = ["SqueezeConfig", "DEFAULT_KEEP_LADDER"]

DEFAULT_KEEP_LADDER = (0.5, 0.3, 0.2, 0.1, 0.05)
_ADDED_WITH_SPREADS = ("variance_term", "always_in_normaliser")  # absent from configs stored before them


@dataclass
class SqueezeConfig:
    """Settings of the index build (clustering, calibration) and of the attention at query time.

    ``keep`` fractions everywhere mean: fraction of the fixed context's tokens whose K/V is attended,
    the always-attended sinks and observation window included.
    """

    prefill_chunk: int = 2048  # tokens per prefill forward pass
    sink_tokens: int = 4  # first tokens of the fixed context, always attended
    window_tokens: int = 64  # observation window: last tokens, always attended, calibration queries
    keys_per_fine: int = 16  # fine level: one centroid per this many keys
    fine_per_coarse: int = 4  # coarse level: one centroid per this many fine centroids (1 per 64 keys)
    kmeans_iters: int = 5  # recall of the selection is flat from 4 to 12 iterations (docs/eval/README.md)
    seed: int = 0
    keep_ladder: tuple[float, ...] = DEFAULT_KEEP_LADDER
    coarse_slack: float = 10.0  # coarse level keeps about this many times the fine keep fraction (docs/eval)
    hierarchical: bool = True
    per_token_selection: bool = True  # multi-token forwards: each token selects its own clusters (as decode does)
    recluster_share: float = 0.25  # insert: full re-cluster once appended tokens pass this share of the corpus
    selection: str = "budget"  # "budget" (top clusters, exact fraction) or "threshold" (calibrated; docs/eval)
    budget_slack: float = 0.0  # budget, Triton: the search may stop once it keeps <= (1 + this) x the budget
    variance_term: bool = True  # estimate adds s^2 |q|^2 v_c / 2 per cluster (v_c: key variance), docs/eval
    always_in_normaliser: bool = True  # estimate's normaliser includes the exact sink + window terms
    centroid_precision: str = "model"  # "fp8": decode lookups score 8-bit centroid tables (kernels/centroid_fp8.py)
    backend: str = "auto"  # "auto" (triton on CUDA, torch elsewhere), "torch", "triton"
    cuda_graphs: bool = True  # CUDA + triton: decode steps replay one captured CUDA graph (graph_decode.py)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep_ladder = tuple(float(k) for k in self.keep_ladder)
        self.validate()

    def validate(self) -> None:
        positive = ("prefill_chunk", "keys_per_fine", "fine_per_coarse", "kmeans_iters")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"SqueezeConfig.{name} must be a positive int; got {value!r}.")
        for name in ("sink_tokens", "window_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"SqueezeConfig.{name} must be an int >= 0; got {value!r}.")
        for k in self.keep_ladder:
            if not 0.0 < k < 1.0:
                raise ConfigError(f"keep_ladder entries must lie in (0, 1); got {k!r}. "
                                  "Use 1.0 for dense at query time.")
        if self.selection not in ("threshold", "budget"):
            raise ConfigError(f"selection must be 'threshold' or 'budget'; got {self.selection!r}.")
        if self.centroid_precision not in ("model", "fp8"):
            raise ConfigError(f"centroid_precision must be 'model' (the index's centroid dtype) or 'fp8' (8-bit "
                              f"tables for decode lookups); got {self.centroid_precision!r}.")
        if self.backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"backend must be 'auto', 'torch' or 'triton'; got {self.backend!r}.")
        if not 0.0 <= self.recluster_share <= 1.0:
            raise ConfigError(f"recluster_share must lie in [0, 1]; got {self.recluster_share!r}.")
        for name in ("variance_term", "always_in_normaliser", "hierarchical", "per_token_selection", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SqueezeConfig.{name} must be True or False; got {getattr(self, name)!r}.")
        if not isinstance(self.budget_slack, (int, float)) or not 0.0 <= self.budget_slack < 1.0:
            raise ConfigError(f"budget_slack must lie in [0, 1) (0: the exact top clusters); "
                              f"got {self.budget_slack!r}.")
        if self.coarse_slack < 1.0:
            raise ConfigError(f"coarse_slack must be >= 1; got {self.coarse_slack!r}.")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["keep_ladder"] = list(self.keep_ladder)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SqueezeConfig":
        """A config from ``to_dict`` output. Settings of the selection estimate that a stored config predates
        get the values its thresholds were calibrated with (plain centroid estimate), not today's defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown SqueezeConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        data = {**{name: False for name in _ADDED_WITH_SPREADS}, **data}
        return cls(**data)


def check_keep(keep: float) -> float:
    """Validate a query-time keep fraction (1.0 means dense)."""
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise ConfigError(f"keep must be a number in (0, 1]; got {keep!r}.") from None
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must lie in (0, 1] (1.0 = dense attention); got {keep}.")
    return keep
