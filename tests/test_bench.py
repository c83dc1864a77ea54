"""``sqattn bench`` end to end at a tiny size: the rows it writes and its check against the torch reference.

On CPU the Triton kernels run under the interpreter (set before any kernel is defined), so the timings mean
nothing here; the test checks the plumbing and the numbers the bench derives from them.
"""

import json
import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # must happen before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sqattn_index.bench import main  # noqa: E402


@pytest.mark.parametrize("fp8", [False, True], ids=["16bit-tables", "fp8-decode-tables"])
def test_bench_flat_decode_rows_and_reference_check(tmp_path, capsys, fp8):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert main(["--contexts", "2048", "--shapes", "llama3-8b", "--keeps", "0.1", "--no-clustering", "--reps", "1",
                 "--prefill-tokens", "16", "--device", dev, "--flat-decode", "--out", str(tmp_path)]
                + (["--fp8-centroids"] if fp8 else [])) in (0, None)
    out = capsys.readouterr().out
    errs = [float(x) for x in re.findall(r"check vs reference: rel RMS ([0-9.e+-]+)", out)]
    assert len(errs) == 2 and max(errs) < 1e-3, out  # decode (flat lookup) and prefill (hierarchical)
    kept = [float(x) for x in re.findall(r"keep 0.1: kept ([0-9.]+) of K/V", out)]
    assert len(kept) == 2 and all(0.09 <= k <= 0.12 for k in kept), kept
    rows = json.loads((tmp_path / "results.json").read_text())
    by_phase = {r["phase"]: r for r in rows if r["phase"] != "copy"}
    assert set(by_phase) == {"decode", "decode-sparse-kernel", "prefill"}
    assert by_phase["decode"]["lookup"] == "flat" and by_phase["decode-sparse-kernel"]["lookup"] == "flat"
    assert by_phase["prefill"]["lookup"] == "hierarchical"
    assert by_phase["decode"]["centroids"] == ("fp8" if fp8 else "bf16") and by_phase["prefill"]["centroids"] == "bf16"
    for r in by_phase.values():
        assert (r["context"], r["keep"], r["shape"]) == (2048, 0.1, "llama3-8b")
        assert abs(r["speedup"] - r["dense_ms"] / r["squeezed_ms"]) < 1e-9 * r["speedup"]
