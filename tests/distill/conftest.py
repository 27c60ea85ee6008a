"""Tiny models trained for a few seconds on a dozen stdlib modules: teachers with something to lose.

They never see json/decoder.py, the text the tests distill on and evaluate with.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lmpress.data import load_documents, tokenize_documents, windows
from lmpress.distill.train import TrainConfig, train

TEACHER_TEXT = {
    "json/encoder.py", "json/__init__.py", "json/scanner.py", "json/tool.py", "abc.py", "base64.py",
    "bisect.py", "colorsys.py", "copy.py", "csv.py", "dataclasses.py",
}  # fmt: skip


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Callable[[str], Path]:  # type: ignore[no-untyped-def]
    """Factory: a tiny model of ``arch`` trained with cross-entropy on json/decoder.py (cached per arch)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("trained")
    docs = [d for d in load_documents("stdlib") if d.path in TEACHER_TEXT]
    data = windows(tokenize_documents(docs, tokenizer), 32)  # about 2300 windows

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))

            def ce(ids: Tensor) -> tuple[Tensor, dict[str, float]]:
                return model(input_ids=ids, labels=ids, use_cache=False).loss, {}

            cfg = TrainConfig(steps=200, batch_size=16, lr=3e-3, precision="fp32", eval_every=1000)
            train(dict(model.named_parameters()), ce, data, cfg)
            out = root / arch
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            made[arch] = out
        return made[arch]

    return make


DISTILL_TEXT = ("json/decoder.py", "heapq.py", "fnmatch.py", "glob.py", "shlex.py", "string.py", "textwrap.py")


@pytest.fixture(scope="session")
def distill_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text the teachers never saw (about 25k tokens): its first half trains, its second half evaluates."""
    docs = {d.path: d.text for d in load_documents("stdlib") if d.path in DISTILL_TEXT}
    path = tmp_path_factory.mktemp("distill") / "text.txt"
    path.write_text("\n".join(docs[p] for p in DISTILL_TEXT))
    return path
