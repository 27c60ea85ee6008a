"""GGUF tokenizers: every tokenizer style lmpress writes splits a mixed text (code, prose, accents,
emoji, CJK, digit and whitespace runs, a special token) in llama.cpp exactly as in transformers.

Styles: byte-level BPE (llama.cpp's ``gpt2`` model: the built-in tokenizer, GPT-2's regex, Llama 3's and
Qwen2's splits) and byte-fallback BPE (its ``llama`` SentencePiece model: Llama 2 with a space prefix,
Gemma without one). The SentencePiece ones are trained here as their converted tokenizer.json files are
built (no hub access).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lmpress
from lmpress.errors import ExportError
from lmpress.export import export
from lmpress.export.gguf_vocab import LLAMA3_SPLIT, MIXED_TEXT, QWEN2_SPLIT, SPACE, tokenizer_metadata
from lmpress.formats.gguf_file import write_gguf
from lmpress.io.load import LoadedModel
from lmpress.sources import load_documents
from tests.export.helpers import kl

try:
    import llama_cpp
except ImportError:
    if os.environ.get("LMPRESS_REQUIRE_LLAMA_CPP"):
        raise
    llama_cpp = None  # type: ignore[assignment]
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python not installed")

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
LLAMA2_SPECIALS = ["<unk>", "<s>", "</s>"]


def _train_spm_style(specials: list[str], size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-style BPE: the special tokens, the 256 byte tokens, then
    pieces that start at a space ("▁word") trained on a few stdlib modules, the rarer characters left
    to the byte fallback."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    docs = [d.text for d in load_documents("stdlib") if d.path in ("json/encoder.py", "abc.py", "csv.py", "base64.py")]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials + byte_tokens, limit_alphabet=90, show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def gemma_tokenizer() -> Any:
    """Gemma 1/2/3's tokenizer as transformers 5 builds it (``GemmaTokenizer``: byte-fallback BPE, spaces
    replaced by "▁" with no prefix, <bos> added), 512 tokens."""
    from transformers import GemmaTokenizer

    vocab, merges = _train_spm_style(GEMMA_SPECIALS, 512)
    return GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=GEMMA_SPECIALS[5:], add_bos_token=True)  # type: ignore[arg-type]


def llama2_tokenizer() -> Any:
    """Llama 2's converted tokenizer.json (a "▁" prepended and spaces replaced by the normalizer, <s> added)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _train_spm_style(LLAMA2_SPECIALS, 600)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _split(base: Any, pattern: str) -> Any:
    """``base`` (byte-level) with a Llama-3- or Qwen2-style regex split in front of its byte mapping."""
    from tokenizers import Regex, pre_tokenizers

    tok = copy.deepcopy(base)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tok


STYLES = ["builtin", "gpt2", "llama3-split", "qwen2-split", "spm-llama2", "spm-gemma"]


@pytest.fixture(scope="module")
def styles(tokenizer: Any) -> Callable[[str], Any]:
    """Factory: the tokenizer of one style (built once)."""
    makers: dict[str, Callable[[], Any]] = {
        "builtin": lambda: lmpress.load("builtin", device="cpu").tokenizer,
        "gpt2": lambda: tokenizer,
        "llama3-split": lambda: _split(tokenizer, LLAMA3_SPLIT),
        "qwen2-split": lambda: _split(tokenizer, QWEN2_SPLIT),
        "spm-llama2": llama2_tokenizer,
        "spm-gemma": gemma_tokenizer,
    }
    made: dict[str, Any] = {}

    def make(style: str) -> Any:
        if style not in made:
            made[style] = makers[style]()
        return made[style]

    return make


def _with_special(tok: Any) -> str:
    """The mixed text with a special token of the tokenizer's in it (Gemma: a chat turn)."""
    if "<start_of_turn>" in tok.get_vocab():
        return f"<start_of_turn>user\n{MIXED_TEXT}<end_of_turn>\n<start_of_turn>model\n"
    return f"{MIXED_TEXT[:120]}{tok.eos_token}{MIXED_TEXT[120:]}"


def _vocab_gguf(tok: Any, path: Path) -> Path:
    write_gguf(path, {"general.architecture": "llama", **tokenizer_metadata(tok, len(tok))}, [])
    return path


@contextmanager
def _llama(path: Path, **kw: Any) -> Iterator[Any]:
    llm = llama_cpp.Llama(model_path=str(path), verbose=False, **kw)  # type: ignore[union-attr]
    try:
        yield llm
    finally:
        llm.close()


@needs_llama
@pytest.mark.parametrize("style", STYLES)
def test_llama_cpp_splits_the_mixed_text_as_transformers(
    style: str, styles: Callable[[str], Any], tmp_path: Path
) -> None:
    tok = styles(style)
    text = _with_special(tok)
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert len(want) > 100 and sum(i in tok.all_special_ids for i in want) >= 1
    with _llama(_vocab_gguf(tok, tmp_path / f"{style}.gguf"), vocab_only=True) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want
        plain = tok(MIXED_TEXT)["input_ids"]  # with <bos> where the tokenizer adds it
        assert llm.tokenize(MIXED_TEXT.encode(), add_bos=True, special=False) == plain
        assert llm.detokenize(plain).decode().removeprefix(" ") == MIXED_TEXT  # Llama 2's prefix space


def test_gemma_is_sentencepiece_without_a_space_prefix(styles: Callable[[str], Any]) -> None:
    """Gemma's tokenizer is written as llama.cpp's convert_hf_to_gguf.py writes it: the ``llama`` model,
    no space prefix, <bos> added, each token's type (control, unknown, byte, normal)."""
    tok = styles("spm-gemma")
    meta = tokenizer_metadata(tok, len(tok))
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is False
    ids = {k.rsplit(".", 1)[1]: int(v.value) for k, v in meta.items() if k.endswith("_token_id")}
    assert ids == {"bos_token_id": 2, "eos_token_id": 1, "unknown_token_id": 3, "padding_token_id": 0}
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    types = meta["tokenizer.ggml.token_type"]
    assert types[:7] == [3, 3, 3, 2, 3, 3, 3] and types[7:263] == [6] * 256 and set(types[263:]) == {1}


def test_gemma_tab_token_in_place_of_its_byte(styles: Callable[[str], Any]) -> None:
    """transformers' Gemma converter writes "\\t" where SentencePiece has <0x09>: llama.cpp falls back to
    that token for the byte, and so does the export's check."""
    from transformers import GemmaTokenizer

    model = json.loads(styles("spm-gemma").backend_tokenizer.to_str())["model"]
    vocab = {("\t" if t == "<0x09>" else t): i for t, i in model["vocab"].items()}
    merges = [tuple(m) for m in model["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=GEMMA_SPECIALS[5:])  # type: ignore[arg-type]
    meta = tokenizer_metadata(tok, len(tok))
    assert meta["tokenizer.ggml.tokens"][7 + 9] == "\t" and meta["tokenizer.ggml.token_type"][7 + 9] == 1


def test_a_tokenizer_that_splits_the_mixed_text_differently_is_refused(styles: Callable[[str], Any]) -> None:
    """A special token that eats the spaces after it (rstrip), which llama.cpp's does not: refused in one
    line naming the text, before anything is written."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    model = json.loads(styles("spm-gemma").backend_tokenizer.to_str())["model"]
    turn = AddedToken("<start_of_turn>", rstrip=True, special=True, normalized=False)
    merges = [tuple(m) for m in model["merges"]]
    odd = GemmaTokenizer(vocab=model["vocab"], merges=merges, extra_special_tokens=[turn, "<end_of_turn>"])  # type: ignore[arg-type]
    with pytest.raises(ExportError, match=r"^llama.cpp's SentencePiece tokenizer would split 'def parse.*differently"):
        tokenizer_metadata(odd, len(odd))


@needs_llama
def test_gemma3_with_its_tokenizer_in_llama_cpp(
    trained_dir: Callable[[str], Path], styles: Callable[[str], Any], tmp_path: Path
) -> None:
    """A Gemma 3 model exported with a Gemma tokenizer: llama.cpp tokenizes a chat turn as transformers
    does (<bos> and the turn tokens included), ends a turn at <end_of_turn>, and its logits match."""
    tok = styles("spm-gemma")
    src = trained_dir("gemma3_text")  # trained with the shared 512-token tokenizer: ids are ids to it
    loaded = lmpress.load(src, device="cpu")
    assert len(tok) == loaded.model.config.vocab_size  # type: ignore[union-attr]
    out = tmp_path / "gemma3.gguf"
    export(LoadedModel(loaded.model, tok, str(src), src), "gguf", out)
    text = _with_special(tok)
    ids = tok(text)["input_ids"]
    with _llama(out, logits_all=True, n_ctx=512, n_threads=2) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        end = tok.convert_tokens_to_ids("<end_of_turn>")
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, end)  # type: ignore[union-attr]
        llm.eval(ids)
        ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        ref = loaded.model.float()(torch.tensor([ids])).logits[0]
    assert kl(ref, ours) < 1e-3


VOCABS = os.environ.get("LMPRESS_LLAMA_CPP_VOCABS")  # llama.cpp's models/ (its source tree, not the wheel)


@needs_llama
@pytest.mark.skipif(not VOCABS, reason="set LMPRESS_LLAMA_CPP_VOCABS to llama.cpp's models/ directory")
def test_gemma_real_vocabulary(tmp_path: Path) -> None:
    """Gemma's 262k vocabulary and merges (llama.cpp's ggml-vocab-gemma-4.gguf) as a Gemma-3-style
    transformers tokenizer: it splits llama.cpp's own test texts as llama.cpp's reference does, and
    lmpress's SentencePiece export of it splits them and the mixed text in llama.cpp as transformers does
    (a minute or two: the export checks every token's own text)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    import gguf

    src = Path(str(VOCABS)) / "ggml-vocab-gemma-4.gguf"
    fields = gguf.GGUFReader(src).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    added = [AddedToken(t, special=k == 3, normalized=False) for t, k in zip(tokens, types, strict=True) if k in (3, 4)]
    tok = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,  # type: ignore[arg-type]
        extra_special_tokens=[a for a in added[5:] if a.special],
    )
    tok.add_tokens([a for a in added if not a.special])
    texts = Path(f"{src}.inp").read_text().split("\n__ggml_vocab_test__\n")
    reference = [[int(i) for i in line.split()] for line in Path(f"{src}.out").read_text().strip("\n").split("\n")]
    assert tok(texts, add_special_tokens=False)["input_ids"] == reference
    texts.append(f"<|turn>user\n{MIXED_TEXT}<turn|>\n")
    with _llama(_vocab_gguf(tok, tmp_path / "gemma.gguf"), vocab_only=True) as llm:
        assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == tok(
            texts, add_special_tokens=False
        )["input_ids"]
