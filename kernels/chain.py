"""Programmatic dependent launch (PDL) for the chains of small kernels a squeezed step launches.

A decode step is a chain of short launches (normaliser -> decisions -> positions -> sparse attention ->
merge), each waiting for the one before. With PDL (Hopper and later) a kernel launched with
``launch_pdl=True`` may start once every program of the kernel before it has signalled
(``gdc_launch_dependents``), so its programs are resident and waiting when that kernel ends, instead of
being launched and dispatched after it. Correctness rests on one rule, kept by ``chain_enter``: every kernel
of the chain signals and then waits (``gdc_wait``: the kernel before it has finished and its writes are
visible) before its first load or store. Only the launch and the index arithmetic before that overlap, and
since each kernel waits for the one before it, each also finishes after every earlier kernel: reading the
output of any earlier launch is safe.

``chain_launch(device)`` gives the launch arguments ``PDL=1, launch_pdl=True`` on a CUDA device of compute
capability 9.0 or newer when ``SETTINGS["pdl"]`` is on (environment ``SQATTN_PDL=0`` turns it off), else
nothing (``PDL`` defaults to 0: no PDL instructions are compiled, as under ``TRITON_INTERPRET=1``).

Measured on an H100 (``benchmarks/gpu_pdl_ab.py``, docs/bench/README.md, session 10): decode steps 2-8%
faster at 32K and 0-3% at 128K, prefill unchanged. Letting the next kernel launch only when a kernel ends
(its implicit signal), for some or all kernels, was no faster than signalling at the start.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["SETTINGS", "chain_enter", "chain_launch"]

SETTINGS = {"pdl": os.environ.get("SQATTN_PDL", "1") != "0"}


def _supported(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _hopper_or_newer(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def chain_launch(device: torch.device) -> dict:
    """Extra launch arguments for a chain kernel on ``device`` (empty where PDL is off or unsupported)."""
    if SETTINGS["pdl"] and _supported(device):
        return {"PDL": 1, "launch_pdl": True}
    return {}


@triton.jit
def chain_enter(PDL: tl.constexpr):
    """First statement of a chain kernel: with PDL let the next kernel launch now, then wait for the kernel
    before to finish."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
