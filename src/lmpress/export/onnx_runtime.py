"""An exported ONNX directory run by ONNX Runtime, measured like any lmpress model.

`OnnxModel` answers the calls lmpress's evaluation makes of a Hugging Face model
(``model(input_ids=..., use_cache=..., past_key_values=...)`` returning ``.logits`` and the cache),
computed by an ``onnxruntime.InferenceSession`` of the graph `lmpress.export.onnx` wrote, so
``lmpress eval DIR`` reports perplexity, KL against ``--reference``, size and prefill/decode speed
of the runtime the directory is deployed with. The tokenizer is the Hugging Face one saved beside
the graph. ``generate`` is greedy decoding with the graph's KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from lmpress.errors import ModelLoadError
from lmpress.export.base import VocabStub
from lmpress.export.onnx import GRAPH_FILE, PARAMETERS_KEY
from lmpress.io.files import read_config


def _load_error(file: Path, e: Exception) -> ModelLoadError:
    """One line for ONNX Runtime's refusal of ``file``: bytes that are no graph (random, empty,
    truncated) are named as such; anything else keeps ONNX Runtime's reason."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    reason = text.rpartition("failed:")[2].strip() or text  # ORT repeats the path before "failed:"
    if type(e).__name__ == "InvalidProtobuf" or "INVALID_PROTOBUF" in text or "No graph was found" in text:
        return ModelLoadError(
            f"{file} is not a valid ONNX graph ({reason[:120]}); re-export it with lmpress export --to onnx"
        )
    return ModelLoadError(f"ONNX Runtime cannot load {file}: {text[:300]}")


@dataclass
class OnnxCache:
    """The graph's ``present.*`` outputs, fed back as ``past_key_values.*``; ``length`` tokens."""

    arrays: dict[str, np.ndarray]
    length: int


class OnnxModel(nn.Module):
    """An ONNX decoder evaluated by ONNX Runtime on CPU; see the module docstring."""

    def __init__(self, path: Path, n_threads: int | None = None) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = n_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path / GRAPH_FILE), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise _load_error(path / GRAPH_FILE, e) from None
        self.path = path
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or not self.past_names:
            raise ModelLoadError(f"{path / GRAPH_FILE} is not a decoder with a KV cache; export it with lmpress export")
        shape = inputs[self.past_names[0]].shape  # (batch, kv heads, past, head dim)
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])
        meta = self.session.get_modelmeta().custom_metadata_map
        self._params = int(meta.get(PARAMETERS_KEY, 0))
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # device and dtype for callers
        self._embed = VocabStub(self.n_vocab)
        config = read_config(path)
        limit = config.get("max_position_embeddings") or config.get("n_positions") or 2048
        self.config = SimpleNamespace(max_position_embeddings=int(limit), model_type="onnx")

    def get_input_embeddings(self) -> nn.Module:
        return self._embed

    def num_logical_params(self) -> int:
        return self._params

    def runtime_bytes(self) -> int:
        """Bytes of the graph's weights (the files ONNX Runtime maps)."""
        return sum(f.stat().st_size for f in self.path.glob(f"{GRAPH_FILE}*"))

    def forward(
        self,
        input_ids: Tensor,
        use_cache: bool = False,
        past_key_values: OnnxCache | None = None,
        attention_mask: Tensor | None = None,
        **_: Any,
    ) -> SimpleNamespace:
        ids = input_ids.cpu().numpy().astype(np.int64)
        batch, new = ids.shape
        past = past_key_values.length if past_key_values is not None else 0
        mask = (
            attention_mask.cpu().numpy().astype(np.int64)
            if attention_mask is not None
            else np.ones((batch, past + new), np.int64)
        )
        feed: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": np.broadcast_to(np.arange(past, past + new, dtype=np.int64), (batch, new)).copy(),
        }
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        for name in self.past_names:
            feed[name] = past_key_values.arrays[name] if past_key_values is not None else empty
        outs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        logits = torch.from_numpy(outs["logits"])
        cache = None
        if use_cache:
            arrays = {"past_key_values." + n[len("present.") :]: v for n, v in outs.items() if n.startswith("present.")}
            cache = OnnxCache(arrays, past + new)
        return SimpleNamespace(logits=logits, past_key_values=cache)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 32, **kwargs: Any) -> Tensor:
        """Greedy continuation with the KV cache (the prompt once, then one token a step)."""
        out = self(input_ids=input_ids, use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            out = self(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1:].argmax(-1))
        return torch.cat([input_ids.cpu(), *tokens], dim=1)

    def extra_repr(self) -> str:
        return f"{self.path.name}, vocab={self.n_vocab}"
