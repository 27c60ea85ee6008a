"""The tokenizer as llama.cpp reads it: the ``tokenizer.ggml.*`` keys of a GGUF file.

Byte-fallback BPE tokenizers (Llama 2, Mistral, Gemma: SentencePiece converted to tokenizer.json) are
written as llama.cpp's ``llama`` model, whose merging follows token scores, with a space prefix or (Gemma)
without; the scores come from the merge ranks, and the split of every token's own text and of a mixed
text with the special tokens in it is checked against the tokenizer before anything is written.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, the built-in one) are written as llama.cpp's
``gpt2`` model: the tokens in id order, their types, the merges and a named pre-tokenizer, which
llama.cpp implements itself. Only pre-tokenizers whose splitting llama.cpp reproduces are written:
GPT-2's (a ``ByteLevel`` with its own regex) and the Llama 3 and Qwen2 split patterns. Anything
else is refused rather than exported to tokenize differently.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from typing import Any

from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32

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


def _vocabulary(tok: dict[str, Any], n_vocab: int) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Every token's id (the model's vocabulary and the added tokens), and the added tokens by text."""
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} embeddings")
    return vocab, added


def tokenizer_metadata(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys for a BPE tokenizer with ``n_vocab`` embedding rows: byte-level
    (llama.cpp's ``gpt2`` model) or with byte fallback (its ``llama`` SentencePiece model)."""
    tok = _backend_json(tokenizer)
    model = tok.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return spm_metadata(tokenizer, tok, n_vocab)
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"only byte-level BPE tokenizers are exported to GGUF so far (this one is {model.get('type')} "
            f"with a {(tok.get('decoder') or {}).get('type')} decoder)"
        )
    pre = pre_tokenizer_name(tok)
    vocab, added = _vocabulary(tok, n_vocab)
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
    return meta | special_metadata(tokenizer)


def special_metadata(tokenizer: Any) -> dict[str, Any]:
    """Special token ids, whether they are added around text, and the chat template."""
    meta: dict[str, Any] = {}
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


# ---- byte-fallback BPE (Llama 2, Mistral): llama.cpp's SentencePiece model ----------------------

SPACE = "\u2581"  # SentencePiece's visible space
SPACE_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
BYTE_TOKEN = re.compile(r"^<0x([0-9A-F]{2})>$")
# text a converted tokenizer must split as llama.cpp does, besides each token's own text
SPM_SAMPLES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def main(argv):\n    return {'a': [1, 2, 3], \"b\": None}  # comment\n\n\tif x >= 10_000:\n",
    "  leading spaces,   runs   of spaces, trailing  ",
    "Zürich, naïve café, 東京, Москва, 123456789, 3.14159, emoji 🙂 and symbols ©™",
)
# code, prose, accents, emoji, CJK, digit runs and whitespace runs in one text; the export checks it
# with the tokenizer's special tokens inside, the tests check it in llama.cpp itself
MIXED_TEXT = (
    "def parse(line: str) -> dict[str, int]:\n"
    "    return {k: int(v) for k, v in (p.split('=') for p in line.split())}\n\n"
    "The quick brown fox didn't jump; it walked 1,234,567 steps in 2026 (about 89.5%).  Café crème, naïve "
    "façade, Zürich, São Paulo, Ærøskøbing; 日本語のテキスト, 中文分词, 한국어; emoji 🙂🚀👍🏽 and ©™.\n"
    "\t\tindented\r\n    four spaces,   three, \n\n\n x=0x1F; y=00012345678901234567890"
)


def _space_prefix(tok: dict[str, Any]) -> tuple[bool, bool]:
    """(whether the tokenizer prefixes text with a space: llama.cpp's ``add_space_prefix``, whether it
    does so also before text that starts with a space); refuses whitespace handling that llama.cpp's
    SentencePiece tokenizer does not reproduce."""
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    if pre == SPACE_SPLIT:  # transformers 5's Gemma: splits on spaces the normalizer has already replaced
        pre = None
    if norm is not None and pre is None:  # the legacy form: [Prepend("▁")], Replace(" ", "▁")
        steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
        kinds = [s.get("type") for s in steps]
        replace = [s for s in steps if s.get("type") == "Replace"]
        if (
            set(kinds) <= {"Prepend", "Replace"}
            and len(replace) == 1
            and (replace[0].get("pattern") or {}).get("String") == " "
            and replace[0].get("content") == SPACE
            and all(s.get("prepend") == SPACE for s in steps if s.get("type") == "Prepend")
        ):
            return "Prepend" in kinds, True
    meta = pre if norm is None and pre is not None and pre.get("type") == "Metaspace" else {}
    if meta.get("replacement") == SPACE and not meta.get("split", False):
        prefix = meta.get("prepend_scheme", "always") != "never"
        if prefix:
            log.warning(
                "the tokenizer does not prefix a space to text that already starts with one%s; llama.cpp "
                "does (as SentencePiece itself does), so such text gets one more leading space token there",
                " nor to text after a special token" if meta.get("prepend_scheme") == "first" else "",
            )
        return prefix, not prefix
    raise ExportError(
        "the byte-fallback tokenizer handles spaces in a way llama.cpp's SentencePiece tokenizer does not "
        f"(normalizer {json.dumps(norm)[:60]}, pre-tokenizer {json.dumps(pre)[:60]})"
    )


def spm_scores(model: dict[str, Any], n_vocab: int) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merging follow the BPE merge order: a token made by
    a merge scores minus the rank of the first merge that makes it (earlier merges win)."""
    vocab: dict[str, int] = model["vocab"]
    scores = [0.0] * n_vocab
    made = [False] * n_vocab
    for rank, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        i = vocab.get(left + right)
        if i is not None and i < n_vocab and not made[i]:
            scores[i], made[i] = -float(rank), True
    for text, i in vocab.items():  # a multi-character token no merge makes: never preferred
        if i < n_vocab and not made[i] and len(text) > 1 and not BYTE_TOKEN.match(text):
            scores[i] = -1e9
    return scores


def spm_tokenize(text: str, ids: dict[str, int], scores: list[float], byte_ids: list[int], prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece tokenization (``llm_tokenizer_spm_session``) of plain text: start
    from UTF-8 characters, merge the adjacent pair whose concatenation is the highest-scoring token
    (leftmost on ties) until none is, and spell what is left over in byte tokens."""
    text = ((" " if prefix else "") + text).replace(" ", SPACE)
    syms = list(text)
    if not syms:
        return []
    alive = [True] * len(syms)
    nxt = [*range(1, len(syms)), -1]
    prv = list(range(-1, len(syms) - 1))
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        tid = ids.get(syms[left] + syms[right])
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], left, right, len(syms[left]) + len(syms[right])))

    for i in range(1, len(syms)):
        push(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or len(syms[left]) + len(syms[right]) != size or nxt[left] != right:
            continue
        syms[left] += syms[right]
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out: list[int] = []
    i = 0
    while i >= 0:
        tid = ids.get(syms[i])
        out += [tid] if tid is not None else [byte_ids[b] for b in syms[i].encode()]
        i = nxt[i]
    return out


def _byte_ids(vocab: dict[str, int]) -> list[int]:
    """The id of each byte's token ``<0xXX>``; for an ASCII byte without one, its character's token, as
    llama.cpp falls back to (Gemma's converted tokenizers have "\\t" in place of <0x09>)."""
    byte_ids = [-1] * 256
    for text, i in vocab.items():
        if (m := BYTE_TOKEN.match(text)) is not None:
            byte_ids[int(m.group(1), 16)] = i
    for b in range(128):
        if byte_ids[b] < 0 and chr(b) in vocab:
            byte_ids[b] = vocab[chr(b)]
    if -1 in byte_ids:
        raise ExportError(f"the byte-fallback tokenizer lacks the byte token <0x{byte_ids.index(-1):02X}>")
    return byte_ids


def spm_encode(
    text: str, ids: dict[str, int], scores: list[float], byte_ids: list[int], prefix: bool, added: dict[str, int]
) -> list[int]:
    """llama.cpp's SentencePiece tokenization of text that may hold added tokens (``llama_vocab::tokenize``
    with special tokens parsed): the text is cut at each added token (``added`` is ordered longest first),
    and each piece between them is tokenized on its own, with the space prefix where it starts the text or
    follows a token."""
    parts: list[str | int] = [text]
    for content in added:
        if content not in text:
            continue
        cut: list[str | int] = []
        for part in parts:
            if isinstance(part, int) or content not in part:
                cut.append(part)
                continue
            for k, piece in enumerate(part.split(content)):
                cut += ([added[content]] if k else []) + ([piece] if piece else [])
        parts = cut
    out: list[int] = []
    after_token = True
    for part in parts:
        out += [part] if isinstance(part, int) else spm_tokenize(part, ids, scores, byte_ids, prefix and after_token)
        after_token = isinstance(part, int)
    return out


def spm_metadata(tokenizer: Any, tok: dict[str, Any], n_vocab: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys of a byte-fallback BPE tokenizer (Llama 2, Mistral, Gemma) as llama.cpp's
    ``llama`` (SentencePiece) model: tokens, scores derived from the merge ranks, and token types; the
    split of every token's own text and of a few samples is checked against the tokenizer's before
    anything is written."""
    model = tok["model"]
    prefix, leading_space_exact = _space_prefix(tok)
    vocab, added = _vocabulary(tok, n_vocab)
    byte_ids = _byte_ids(model["vocab"])
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    unk = model.get("unk_token") or getattr(tokenizer, "unk_token", None)
    for content, i in vocab.items():
        tokens[i] = content
        a = added.get(content)
        if content == unk:
            types[i] = UNKNOWN
        elif a is not None:
            types[i] = CONTROL if a.get("special") else USER_DEFINED
        else:
            types[i] = BYTE if BYTE_TOKEN.match(content) else NORMAL
    scores = spm_scores(model, n_vocab)
    plain = {t: i for t, i in model["vocab"].items() if i < n_vocab}
    own = [t.replace(SPACE, " ") for t in plain if not BYTE_TOKEN.match(t) and t not in added]
    samples = [*SPM_SAMPLES, MIXED_TEXT, *own]
    if leading_space_exact:  # the mixed text around the special tokens, with spaces an lstrip or rstrip would eat
        specials = " ".join([t for t, a in added.items() if a.get("special")][:64])
        samples.append(f"{MIXED_TEXT[:80]} {specials} \n{MIXED_TEXT[80:]}")
    else:  # text that starts with a space, or follows a special token, is split differently there (warned)
        samples = [t.lstrip(" ") for t in samples if t.strip(" ")]
    expected = tokenizer(samples, add_special_tokens=False)["input_ids"]
    longest_first = {t: vocab[t] for t in sorted(added, key=lambda t: -len(t.encode()))}
    any_added = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    for text, want in zip(samples, expected, strict=True):
        if any_added.search(text):
            got = spm_encode(text, plain, scores, byte_ids, prefix, longest_first)
        else:
            got = spm_tokenize(text, plain, scores, byte_ids, prefix)
        if got != want:
            raise ExportError(
                f"llama.cpp's SentencePiece tokenizer would split {text[:40]!r} differently "
                f"({got[:8]} instead of {want[:8]}); this tokenizer cannot be exported to GGUF as it is"
            )
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": prefix,
    }
    return meta | special_metadata(tokenizer)
