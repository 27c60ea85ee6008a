"""The tokenizer as llama.cpp reads it: the ``tokenizer.ggml.*`` keys of a GGUF file.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, the built-in one) are written as llama.cpp's
``gpt2`` model: the tokens in id order, their types, the merges and a named pre-tokenizer, which
llama.cpp implements itself. Only pre-tokenizers whose splitting llama.cpp reproduces are written:
GPT-2's (a ``ByteLevel`` with its own regex) and the Llama 3 and Qwen2 split patterns. Anything
else is refused rather than exported to tokenize differently.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lmpress.export.gguf_file import U32
from lmpress.export.walk import ExportError

log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names for the split regexes it implements
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
# token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ExportError(
            f"{type(tokenizer).__name__} has no fast (tokenizer.json) form; "
            "GGUF export needs a tokenizers-backed tokenizer"
        )
    return json.loads(backend.to_str())  # type: ignore[no-any-return]


def pre_tokenizer_name(tok: dict[str, Any]) -> str:
    """llama.cpp's name for this tokenizer's byte-level pre-tokenization, or an error."""
    pre = tok.get("pre_tokenizer") or {}
    norm = tok.get("normalizer") or {}
    if norm.get("type") == "NFC":  # Qwen2's: llama.cpp does not normalize (nor does its own converter)
        log.warning(
            "the tokenizer applies NFC normalization, which llama.cpp does not: text with decomposed "
            "accents may tokenize differently there"
        )
    elif norm:
        raise ExportError(
            f"the tokenizer normalizes text ({norm.get('type')}) before splitting, which llama.cpp's BPE does not do"
        )
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise ExportError("the tokenizer adds a prefix space, which llama.cpp's gpt-2 pre-tokenizer does not")
        return "gpt-2"
    if pre.get("type") == "Sequence":
        items = pre.get("pretokenizers", [])
        if (
            len(items) == 2
            and items[0].get("type") == "Split"
            and items[1].get("type") == "ByteLevel"
            and not items[1].get("use_regex", True)
        ):
            pattern = (items[0].get("pattern") or {}).get("Regex")
            if pattern in SPLITS:
                return SPLITS[pattern]
    raise ExportError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:80]}...) is not one llama.cpp reproduces "
        "(GPT-2, Llama 3 or Qwen2 byte-level BPE); it would tokenize differently there"
    )


def tokenizer_metadata(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys for a byte-level BPE tokenizer with ``n_vocab`` embedding rows."""
    tok = _backend_json(tokenizer)
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"only byte-level BPE tokenizers are exported to GGUF so far (this one is {model.get('type')} "
            f"with a {(tok.get('decoder') or {}).get('type')} decoder)"
        )
    pre = pre_tokenizer_name(tok)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for content, i in vocab.items():
        tokens[i] = content
        a = added.get(content)
        types[i] = NORMAL if a is None else (CONTROL if a.get("special") else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id")):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int):
            meta[f"tokenizer.ggml.{key}_token_id"] = U32(tid)
    pad = getattr(tokenizer, "pad_token_id", None)
    if isinstance(pad, int):
        meta["tokenizer.ggml.padding_token_id"] = U32(pad)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    meta["tokenizer.ggml.add_bos_token"] = bool(len(ids) > len(plain) and ids[0] == bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(len(ids) > len(plain) and ids[-1] == eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = template
    return meta
