"""``vocab``: keep only the tokens a domain uses; shrink the embedding and the output head to match.

A model shipped for one domain (email parsing, JSON, HTTP) carries embedding and head rows for
every token of its general vocabulary; in a small model these are a large share of the weights.

What is kept:

- every token the original tokenizer produces on the domain corpus (``min_count`` times or more);
- the merge closure: for BPE, every token that a kept token is merged from (recursively), so that
  every merge the original tokenizer applied on the corpus is still there, in the same order; the
  pruned tokenizer then splits the corpus into exactly the same pieces;
- the special and added tokens, the unknown token, and the base alphabet that lets any text be
  encoded: the 256 byte symbols of a byte-level BPE, or the ``<0x00>``..``<0xFF>`` tokens of a
  byte-fallback BPE. A tokenizer with neither would lose text, so it is refused.

Ids are renumbered in the original order; the tokenizer is rebuilt (``tokenizer.json`` with the
pruned vocabulary and merges, remapped post-processor and added-token ids) and loads with
``AutoTokenizer``; the model's embedding and head rows (and head bias) are sliced and its config's
vocabulary size and special-token ids updated, so the result loads with plain ``transformers``.
On the corpus the pruned model's logits are the original's restricted to the kept tokens: the same
next-token predictions wherever the original's top choice is a kept token. The stage checks the
identical tokenization on the corpus before it returns.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from lmpress.errors import LmpressError
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.sources import load_documents

log = logging.getLogger(__name__)
BYTE_FALLBACK = [f"<0x{i:02X}>" for i in range(256)]
STALE_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


class VocabError(LmpressError):
    """Vocabulary pruning that cannot be done as asked."""


class VocabConfig(MethodConfig):
    """Keep the tokens a domain corpus uses (and what any text needs); drop the rest."""

    method: Literal["vocab"] = "vocab"
    data: str | None = None  # the domain corpus (file, directory, .jsonl, 'stdlib'); None: the run's --data
    pattern: str = "**/*"  # files inside a directory corpus
    text_field: str = "text"
    min_count: int = Field(1, ge=1)  # a token used fewer times on the corpus is dropped (1: keep all used)


# ---- the tokenizer ------------------------------------------------------------------------------


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's full description (``tokenizer.json``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(
            "vocab: the tokenizer is not a fast (tokenizers) tokenizer; convert it to tokenizer.json first"
        )
    spec: dict[str, Any] = json.loads(backend.to_str())
    return spec


def _byte_level(spec: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(spec.get("pre_tokenizer"))


def base_tokens(spec: dict[str, Any]) -> set[str]:
    """What any text needs to stay encodable: the byte-level alphabet or the byte-fallback tokens."""
    from tokenizers import pre_tokenizers

    model = spec["model"]
    if model.get("type") != "BPE":
        raise VocabError(
            f"vocab: {model.get('type')} tokenizers are not supported; vocabulary pruning needs a BPE tokenizer"
        )
    vocab = model["vocab"]
    if _byte_level(spec):
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        missing = alphabet - set(vocab)
        if missing:
            raise VocabError(
                f"vocab: the byte-level tokenizer lacks {len(missing)} of its 256 byte symbols; it cannot "
                "encode every text, so pruning it would be unsafe"
            )
        return alphabet
    if model.get("byte_fallback"):
        missing_bytes = [t for t in BYTE_FALLBACK if t not in vocab]
        if missing_bytes:
            raise VocabError(f"vocab: byte fallback is on but {missing_bytes[0]} is not in the vocabulary")
        return set(BYTE_FALLBACK)
    raise VocabError(
        "vocab: the tokenizer has neither a byte-level alphabet nor byte fallback, so a pruned vocabulary "
        "would leave text it cannot encode; use a byte-level or byte-fallback BPE tokenizer"
    )


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]  # type: ignore[misc]


def _merged(model: dict[str, Any], a: str, b: str) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix) :] if prefix and b.startswith(prefix) else b)


def merge_closure(model: dict[str, Any], keep: set[str]) -> set[str]:
    """``keep`` plus every token a kept token is merged from, recursively."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(model):
        producers.setdefault(_merged(model, a, b), []).append((a, b))
    closed, todo = set(keep), list(keep)
    while todo:
        for a, b in producers.get(todo.pop(), ()):
            for part in (a, b):
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return closed


def _remap_ids(node: Any, old_to_new: dict[int, int]) -> Any:
    """Post-processor ids (TemplateProcessing ``ids``, Roberta/Bert ``sep``/``cls`` pairs) in new ids."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [old_to_new[i] for i in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], old_to_new[v[1]]]
            else:
                out[k] = _remap_ids(v, old_to_new)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, old_to_new) for v in node]
    return node


def pruned_tokenizer(tokenizer: Any, kept: list[int]) -> Any:
    """A new tokenizer of the same class whose ids are positions in ``kept`` (old ids, ascending)."""
    from transformers import AutoTokenizer

    spec = tokenizer_json(tokenizer)
    model = spec["model"]
    old_to_new = {old: new for new, old in enumerate(kept)}
    id_to_token = {i: t for t, i in model["vocab"].items()}
    kept_tokens = {id_to_token[i] for i in kept if i in id_to_token}
    model["vocab"] = {id_to_token[i]: old_to_new[i] for i in kept if i in id_to_token}
    merges = [
        [a, b]
        for a, b in _merges(model)
        if a in kept_tokens and b in kept_tokens and _merged(model, a, b) in kept_tokens
    ]
    model["merges"] = merges
    spec["added_tokens"] = [{**t, "id": old_to_new[t["id"]]} for t in spec.get("added_tokens", [])]
    spec["post_processor"] = _remap_ids(spec.get("post_processor"), old_to_new)
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for name in STALE_FILES:  # slow-tokenizer files would describe the old vocabulary
            (Path(d) / name).unlink(missing_ok=True)
        (Path(d) / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        cfg_path = Path(d) / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            decoder = cfg.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                cfg["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in decoder.items()}
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(d)


def encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without added special tokens."""
    out: list[list[int]] = []
    for i in range(0, len(texts), 64):
        enc = tokenizer(texts[i : i + 64], add_special_tokens=False)["input_ids"]
        out.extend(enc)
    return out


# ---- the model ----------------------------------------------------------------------------------


def prune_embeddings(model: nn.Module, kept: Tensor) -> dict[str, int]:
    """Slice the token embedding and the head to ``kept`` rows (old ids in new order); fix the config."""
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    # a subclass is the family's own (Gemma's scaled embedding); lmpress's compressed layers are not one
    if not isinstance(embed, nn.Embedding) or (head is not None and type(head) is not nn.Linear):
        raise VocabError(
            "vocab: the embedding or head is already compressed; put the vocab stage before quantizing them"
        )
    tied = head is not None and head.weight is embed.weight
    old_rows = int(embed.weight.shape[0])
    if int(kept.max()) >= old_rows:
        raise VocabError(f"vocab: the tokenizer has ids up to {int(kept.max())} but the embedding only {old_rows} rows")
    kept = kept.to(embed.weight.device)
    pad = embed.padding_idx
    new_pad = int((kept == pad).nonzero()[0, 0]) if pad is not None and bool((kept == pad).any()) else None
    new_embed = embed  # sliced in place: the family's own class keeps what else it holds (Gemma's scale)
    weight = embed.weight
    new_embed.weight = nn.Parameter(weight.detach()[kept].clone(), requires_grad=weight.requires_grad)
    new_embed.num_embeddings, new_embed.padding_idx = len(kept), new_pad
    removed = (old_rows - len(kept)) * embed.embedding_dim
    if head is not None:
        new_head = nn.Linear(head.in_features, len(kept), bias=head.bias is not None, device=head.weight.device)
        new_head.weight = new_embed.weight if tied else nn.Parameter(head.weight.detach()[kept].clone())
        if head.bias is not None:
            new_head.bias = nn.Parameter(head.bias.detach()[kept].clone())
        new_head.to(head.weight.dtype)
        model.set_output_embeddings(new_head)  # type: ignore[operator]
        if not tied:
            removed += (old_rows - len(kept)) * head.in_features
        if head.bias is not None:
            removed += old_rows - len(kept)
    config: Any = model.config
    old_to_new = {int(o): n for n, o in enumerate(kept.tolist())}
    config.vocab_size = len(kept)
    for holder in (config, getattr(model, "generation_config", None)):
        if holder is None:
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            value = getattr(holder, key, None)
            if isinstance(value, int):
                setattr(holder, key, old_to_new.get(value))
            elif isinstance(value, list):
                setattr(holder, key, [old_to_new[v] for v in value if v in old_to_new])
    return {"rows_before": old_rows, "rows_after": len(kept), "parameters_removed": removed}


def token_map(kept: Tensor, old_size: int) -> Tensor:
    """old id -> new id, -1 where the token was dropped.  (old_size,) int64"""
    m = torch.full((old_size,), -1, dtype=torch.long)
    m[kept.cpu()] = torch.arange(len(kept))
    return m


# ---- the stage ----------------------------------------------------------------------------------


def domain_texts(config: VocabConfig, ctx: Context) -> list[str]:
    if config.data is not None:
        docs = load_documents(config.data, pattern=config.pattern, text_field=config.text_field)
        texts = [d.text for d in docs]
    elif ctx.corpus is not None:
        texts = ctx.corpus()
    else:
        raise VocabError("vocab: no domain corpus; set data: PATH in the stage or pass --data")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise VocabError("vocab: the domain corpus is empty; give text files with content (data: PATH or --data)")
    return texts


def choose_tokens(tokenizer: Any, texts: list[str], min_count: int) -> tuple[list[int], Counter[int], list[list[int]]]:
    """Old ids to keep (ascending), the corpus counts, and the corpus's original encoding."""
    spec = tokenizer_json(tokenizer)
    model = spec["model"]
    base = base_tokens(spec)
    encoded = encode_all(tokenizer, texts)
    counts: Counter[int] = Counter(i for ids in encoded for i in ids)
    vocab: dict[str, int] = model["vocab"]
    id_to_token = {i: t for t, i in vocab.items()}
    used = {id_to_token[i] for i, c in counts.items() if c >= min_count and i in id_to_token}
    keep_tokens = merge_closure(model, used | (base & set(vocab)))
    specials = {t["id"] for t in spec.get("added_tokens", [])} | set(getattr(tokenizer, "all_special_ids", []))
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        specials.add(vocab[unk])
    kept = sorted({vocab[t] for t in keep_tokens} | {i for i in specials if i is not None})
    return kept, counts, encoded


def same_pieces(old: list[list[int]], new: list[list[int]], mapping: Tensor) -> tuple[float, int]:
    """Share of the corpus's original tokens that the new tokenizer produces unchanged (ids mapped),
    aligned by longest matching runs; and the corpus's token count."""
    from difflib import SequenceMatcher

    same = total = 0
    for old_ids, new_ids in zip(old, new, strict=True):
        total += len(old_ids)
        mapped = mapping[torch.tensor(old_ids, dtype=torch.long)].tolist() if old_ids else []
        if mapped == new_ids:
            same += len(old_ids)
        else:
            blocks = SequenceMatcher(None, mapped, new_ids, autojunk=False).get_matching_blocks()
            same += sum(b.size for b in blocks)
    return same / max(total, 1), total


@torch.no_grad()
def apply(model: nn.Module, config: VocabConfig, ctx: Context) -> StageReport:
    t0 = time.perf_counter()
    texts = domain_texts(config, ctx)
    old_tok = ctx.tokenizer
    kept, counts, encoded = choose_tokens(old_tok, texts, config.min_count)
    old_size = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    new_tok = pruned_tokenizer(old_tok, kept)
    kept_t = torch.tensor(kept, dtype=torch.long)
    mapping = token_map(kept_t, max(old_size, int(kept_t.max()) + 1))
    identical, total = same_pieces(encoded, encode_all(new_tok, texts), mapping)
    if config.min_count == 1 and identical < 1.0:
        raise VocabError(
            f"vocab: the pruned tokenizer splits {1 - identical:.2%} of the corpus differently; this is a bug, "
            "please report it with the tokenizer"
        )
    report = prune_embeddings(model, kept_t)
    ctx.retokenize(new_tok, mapping)
    log.info("vocab: kept %d of %d tokens", len(kept), old_size)
    return {
        "tokens_kept": len(kept),
        "tokens_before": old_size,
        "corpus_tokens": total,
        "corpus_distinct": len(counts),
        "identical_tokenization": identical,
        **report,
        "vocab_seconds": time.perf_counter() - t0,
    }


METHOD = Method("vocab", VocabConfig, apply, "vocabulary pruning to a domain: smaller embedding, head and tokenizer")
