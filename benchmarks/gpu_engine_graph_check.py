"""GPU check of the engine's CUDA-graph decoding: the same answers with ``cuda_graphs`` on and off.

A random-weight Llama (4 layers, 8 query / 2 KV heads, head_dim 64) with the SmolLM2 tokenizer (a folder
given by --tokenizer: tokenizer.json, tokenizer_config.json, chat_template.jinja) answers a question over a
synthetic corpus through ``SqueezedEngine`` (Triton backend), greedily, with decode steps eager and replayed
from a CUDA graph. Prints per keep and dtype: same tokens?, decode ms/token each way, KV budget each way.

    python benchmarks/gpu_engine_graph_check.py --tokenizer TOKENIZER_DIR [--tokens 8000]
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def make_model(tokenizer_dir: str, folder: str) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=16384,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(7)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def corpus_texts(tokens: int) -> list[str]:
    words = ["river", "lantern", "copper", "meadow", "signal", "harbor", "orchard", "quartz", "willow", "ember"]
    docs, n = [], 0
    i = 0
    while n < tokens:
        sent = " ".join(f"The {words[(i + j) % 10]} code is {(i * 7919 + j * 104729) % 10000}." for j in range(40))
        docs.append(sent)
        n += len(sent.split()) * 2
        i += 1
    return docs


def main(argv=None) -> int:
    from sqattn_index.config import SqueezeConfig
    from sqattn_index.engine import SqueezedEngine
    from sqattn_index.model_loading import load_local_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="tiny-llama-")
    make_model(args.tokenizer, folder)
    question = "What is the lantern code?"
    for dtype in (torch.float32, torch.bfloat16):
        local = load_local_model(folder, device="cuda", dtype=dtype, progress=False)
        engines = {g: SqueezedEngine(local, SqueezeConfig(cuda_graphs=g, backend="triton")) for g in (False, True)}
        corpus, _ = engines[False].build_corpus(corpus_texts(args.tokens))
        print(f"dtype {dtype}, corpus {corpus.num_tokens} tokens, graphs enabled: "
              f"{engines[True].graphs_enabled(corpus)}", flush=True)
        for keep in (1.0, 0.2, 0.1):
            res = {}
            for g, eng in engines.items():
                eng.answer(corpus, question, keep=keep, max_new_tokens=4)  # warm-up (Triton compiles)
                res[g] = eng.answer(corpus, question, keep=keep, max_new_tokens=args.max_new_tokens)
            a, b = res[False], res[True]
            common = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                          min(len(a.token_ids), len(b.token_ids)))
            print(f"  keep {keep}: same tokens {a.token_ids == b.token_ids} (first {common} of "
                  f"{len(a.token_ids)} equal); decode {1e3 * a.seconds['decode_per_token']:.2f} ms/token eager, "
                  f"{1e3 * b.seconds['decode_per_token']:.2f} with graphs; KV budget {a.kv_budget:.4f} / "
                  f"{b.kv_budget:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
