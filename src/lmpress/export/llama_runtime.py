"""A GGUF file run by llama.cpp (through llama-cpp-python), measured like any lmpress model.

`LlamaCppModel` answers the calls lmpress's evaluation makes of a Hugging Face model
(``model(input_ids=..., use_cache=..., past_key_values=...)`` returning ``.logits``), computed by
llama.cpp itself, so ``lmpress eval FILE.gguf`` reports perplexity, KL against ``--reference``,
size and prefill/decode speed of the runtime the file is deployed with, in the same table as an
eager lmpress model. `LlamaCppTokenizer` is llama.cpp's own tokenizer behind the interface the
data pipeline uses. Each window is scored from an empty context; llama.cpp runs one sequence at a
time, so "batch 8" prefill is eight sequences one after another.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import llama_cpp
import numpy as np
import torch
from torch import Tensor, nn

from lmpress.errors import ModelLoadError
from lmpress.export.base import VocabStub


class LlamaCppModel(nn.Module):
    """A GGUF model evaluated by llama.cpp; see the module docstring."""

    def __init__(self, path: Path, n_threads: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__()
        threads = n_threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                logits_all=True,
                n_ctx=n_ctx or 2048,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=512,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0]}") from None
        self.path = path
        self.n_vocab = int(self.llm.n_vocab())
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # device and dtype for callers
        self._embed = VocabStub(self.n_vocab)
        n_train = int(self.llm._model.n_ctx_train())
        self.config = SimpleNamespace(max_position_embeddings=min(n_train, int(self.llm.n_ctx())), model_type="gguf")

    def get_input_embeddings(self) -> nn.Module:
        return self._embed

    def num_logical_params(self) -> int:
        return int(self.llm._model.n_params())

    def runtime_bytes(self) -> int:
        """Bytes of the weights llama.cpp holds."""
        return int(self.llm._model.size())

    def _eval(self, ids: list[int]) -> Tensor:
        """Logits for ``ids`` appended to the current context.  (len(ids), vocab)"""
        start = self.llm.n_tokens
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[start : start + len(ids)], dtype=np.float32))

    def forward(
        self, input_ids: Tensor, use_cache: bool = False, past_key_values: Any = None, **_: Any
    ) -> SimpleNamespace:
        rows = []
        for row in input_ids.tolist():
            if past_key_values is None:  # a new sequence from an empty context
                self.llm.reset()
            rows.append(self._eval(row))
        logits = torch.stack(rows)  # (B, T, V)
        return SimpleNamespace(logits=logits, past_key_values=self.llm.n_tokens if use_cache else None)

    def extra_repr(self) -> str:
        return f"{self.path.name}, vocab={self.n_vocab}"


class LlamaCppTokenizer:
    """llama.cpp's tokenizer for the same file, as the data pipeline calls a Hugging Face one."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.llm = model.llm
        self.eos_token_id: int | None = int(self.llm.token_eos())
        self.bos_token_id: int | None = int(self.llm.token_bos())

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else text
        add_bos = add_special_tokens and bool(self.llm._model.add_bos_token())
        ids = [self.llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=False) for t in texts]
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids: list[int], **_: Any) -> str:
        return bytes(self.llm.detokenize(ids)).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return int(self.llm.n_vocab())
