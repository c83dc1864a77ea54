"""The precomputed, clustered KV cache of a fixed context: one ``LayerKV`` per decoder layer.

Layout of one layer, per KV head ``h`` (every head has its own clustering, hence its own order):

    sorted position:  [0, S)             sinks (first S tokens, original order), always attended
                      [S, N - W)         clustered tokens, sorted by (coarse, fine) cluster
                      [N - W, N)         observation window (last W tokens, original order), always attended

``fine_offsets[h, j] .. fine_offsets[h, j + 1]`` is fine cluster j's contiguous range of sorted positions;
``coarse_offsets[h, c] .. coarse_offsets[h, c + 1]`` is the range of *fine cluster indices* inside coarse cluster c.
``perm[h, i]`` is the original position of sorted position i. Attention does not depend on key order
(positions are already inside post-RoPE keys), so a selection of clusters is a list of contiguous ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerKV", "CorpusKV"]


@dataclass
class LayerKV:
    """One layer's fixed-context KV in cluster order, its centroids and calibrated thresholds.

    Tensors (``Hk`` KV heads, ``N`` tokens, ``D`` head dim, ``Cf`` fine and ``Cc`` coarse clusters per head):
        keys            [Hk, N, D]   model dtype, post-RoPE, sorted order
        values          [Hk, N, D]   model dtype, sorted order
        perm            [Hk, N]      int64, original position of each sorted position
        fine_centroids  [Hk, Cf, D]  float32, mean of the raw keys of each fine cluster
        fine_sizes      [Hk, Cf]     int64, keys per fine cluster (>= 1)
        fine_offsets    [Hk, Cf + 1] int64, absolute sorted positions; fine_offsets[:, 0] == S, [:, -1] == N - W
        coarse_centroids[Hk, Cc, D]  float32, size-weighted mean of the fine centroids of each coarse cluster
        coarse_sizes    [Hk, Cc]     int64, keys per coarse cluster
        coarse_offsets  [Hk, Cc + 1] int64, fine cluster index ranges; coarse_offsets[:, 0] == 0, [:, -1] == Cf
        thresholds      [L, Hk]      float32, fine per-key probability thresholds, one row per keep in ``keep_ladder``
        coarse_thresholds [L, Hk]    float32, the coarse level's thresholds for the same ladder
        fine_spread     [Hk, Cf]     float32, per-dimension variance of each fine cluster's keys around its
                                     centroid, mean |k - c|^2 / D (the selection's variance term)
        coarse_spread   [Hk, Cc]     float32, the same over all keys of each coarse cluster
    """

    keys: torch.Tensor
    values: torch.Tensor
    perm: torch.Tensor
    fine_centroids: torch.Tensor
    fine_sizes: torch.Tensor
    fine_offsets: torch.Tensor
    coarse_centroids: torch.Tensor
    coarse_sizes: torch.Tensor
    coarse_offsets: torch.Tensor
    sink_tokens: int
    window_tokens: int
    keep_ladder: tuple[float, ...] = ()
    thresholds: torch.Tensor | None = None
    coarse_thresholds: torch.Tensor | None = None
    fine_spread: torch.Tensor | None = None
    coarse_spread: torch.Tensor | None = None

    TENSOR_FIELDS = (
        "keys", "values", "perm", "fine_centroids", "fine_sizes", "fine_offsets",
        "coarse_centroids", "coarse_sizes", "coarse_offsets", "thresholds", "coarse_thresholds",
        "fine_spread", "coarse_spread",
    )
    OPTIONAL_FIELDS = ("thresholds", "coarse_thresholds", "fine_spread", "coarse_spread")

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[2]

    @property
    def num_fine(self) -> int:
        return self.fine_centroids.shape[1]

    @property
    def num_coarse(self) -> int:
        return self.coarse_centroids.shape[1]

    @property
    def clustered_range(self) -> tuple[int, int]:
        """Sorted positions [start, end) covered by clusters."""
        return self.sink_tokens, self.num_tokens - self.window_tokens

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors by field name (thresholds included when calibrated)."""
        out = {}
        for name in self.TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to(self, device: torch.device | str) -> "LayerKV":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return LayerKV(**moved, sink_tokens=self.sink_tokens, window_tokens=self.window_tokens,
                       keep_ladder=self.keep_ladder)

    def fp8_tables(self) -> dict[str, torch.Tensor]:
        """The lookup's 8-bit centroid arguments (``kernels.centroid_fp8``: float8 e4m3 tables and their
        power-of-two scales), made on first use and kept with the layer (``to`` makes a new layer)."""
        cached = self.__dict__.get("_fp8")
        if cached is None:
            from .kernels.centroid_fp8 import lookup_tables

            cached = self.__dict__["_fp8"] = lookup_tables(self.fine_centroids, self.coarse_centroids)
        return cached

    def check(self) -> None:
        """Internal invariants of the layout (raise AssertionError on a programming error)."""
        hk, n, d = self.keys.shape
        assert self.values.shape == (hk, n, d)
        assert self.perm.shape == (hk, n)
        s, e = self.clustered_range
        assert bool((self.fine_offsets[:, 0] == s).all()) and bool((self.fine_offsets[:, -1] == e).all())
        assert bool((self.coarse_offsets[:, 0] == 0).all())
        assert bool((self.coarse_offsets[:, -1] == self.num_fine).all())
        assert bool((self.fine_sizes == self.fine_offsets.diff(dim=1)).all())


@dataclass
class CorpusKV:
    """The fixed context of an index: its token ids and one ``LayerKV`` per decoder layer."""

    input_ids: torch.Tensor  # [N] int64, the fixed prefix's token ids
    layers: list[LayerKV]
    keep_ladder: tuple[float, ...] = ()
    build_seconds: dict = field(default_factory=dict)  # {"prefill": s, "clustering": s, "calibration": s}

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to(self, device: torch.device | str) -> "CorpusKV":
        return CorpusKV(self.input_ids, [layer.to(device) for layer in self.layers], self.keep_ladder,
                        dict(self.build_seconds))

    def nbytes(self) -> dict[str, int]:
        """Bytes of the K/V and of the centroids over all layers."""
        kv = sum(l.keys.nbytes + l.values.nbytes for l in self.layers)
        cent = sum(l.fine_centroids.nbytes + l.coarse_centroids.nbytes for l in self.layers)
        return {"kv": kv, "centroids": cent}
