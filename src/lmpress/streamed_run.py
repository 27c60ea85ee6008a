"""The streamed model source: post-training stages on a model bigger than memory, one block at a time.

A `StreamedSource` is the `lmpress.model_source.ModelSource` of a run that streams: the stages run
on a meta-device model whose blocks the calibration driver brings in and writes out
(`lmpress.streaming`); the original is not copied but read again from disk, block by block, beside
the compressed model during evaluation (`lmpress.evaluation.streamed_quality`); the output's shards
are written unit by unit. Speed and generation samples need a whole model and are measured after
saving only when each model alone fits the memory budget. The original's own metrics and its last
hidden states on the evaluation windows are cached by model and data hash, so compressing the same
model again runs only the original's head (KL stays exact) and does not time it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmpress import evaluation
from lmpress.data import TokenData
from lmpress.data_options import DataOptions
from lmpress.errors import ModelLoadError
from lmpress.io import load_model, resolve_dtype, weight_bytes, write_json_atomic
from lmpress.io.files import clean_stale, work_place
from lmpress.io.tensors import read_header, read_tensor
from lmpress.memory import Budget
from lmpress.method import Context
from lmpress.model_source import Measured, Measuring
from lmpress.streaming import close, open_streamed, save_streamed_dir

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where measurements of unchanged originals are kept: $LMPRESS_CACHE, else ~/.cache/lmpress."""
    root = (
        os.environ.get("LMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmpress"
    )
    return Path(root)


def model_fingerprint(path: Path) -> str:
    """A hash of a model directory's config and safetensors files (headers, sizes, times): cheap
    for a 16 GB model, and it changes when any weight file does."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 2**24)))
    return h.hexdigest()[:24]


def _cached(key: str) -> dict[str, float] | None:
    f = cache_dir() / "original-metrics" / f"{key}.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else None  # type: ignore[no-any-return]
    except (OSError, json.JSONDecodeError):
        return None


def _store(key: str, metrics: dict[str, float]) -> None:
    try:
        write_json_atomic(cache_dir() / "original-metrics" / f"{key}.json", metrics)
    except OSError as e:  # a read-only home is no reason to fail the run
        log.warning("cannot cache the original's metrics (%s)", e)


HIDDEN_CACHE_MAX = 2**31  # bytes of an original's last hidden states worth keeping


def _cached_hidden(key: str) -> list[torch.Tensor] | None:
    """The original's last hidden states on an evaluation set, from an earlier run (None if absent)."""
    f = cache_dir() / "original-hidden" / f"{key}.safetensors"
    try:
        if not f.is_file():
            return None
        header = read_header(f)
        return [read_tensor(f, header, str(i)) for i in range(len(header) - ("__metadata__" in header))]
    except (OSError, ValueError, KeyError, ModelLoadError):
        return None


def _store_hidden(key: str, hidden: list[torch.Tensor]) -> None:
    """Keep the original's last hidden states (per evaluation batch) so that compressing the same
    model again on the same text runs only its head: its logits, and so KL, are exactly the same."""
    if sum(h.numel() * h.element_size() for h in hidden) > HIDDEN_CACHE_MAX:
        return
    root = cache_dir() / "original-hidden"
    tmp = root / f".{key}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        save_file({str(i): h.contiguous() for i, h in enumerate(hidden)}, str(tmp))
        os.replace(tmp, root / f"{key}.safetensors")
    except OSError as e:  # a read-only home is no reason to fail the run
        tmp.unlink(missing_ok=True)
        log.warning("cannot cache the original's hidden states (%s)", e)


def streamed_size(model: nn.Module, where: Path) -> dict[str, float]:
    """`lmpress.evaluation.size` from the files: a streamed model is never whole in memory."""
    nbytes = weight_bytes(where)
    return {
        **evaluation.bits_per_weight(
            evaluation.count_parameters(model), evaluation.count_parameters(model, dense=True), nbytes
        ),
        "bytes": float(nbytes),
        "bytes_on_disk": float(nbytes),
        "weights_memory_mb": nbytes / 2**20,
    }


def model_params_of(path: Path, dtype: str) -> nn.Module:
    """The architecture of ``path`` on the meta device (to count its parameters)."""
    m = open_streamed(path, resolve_dtype(dtype))
    close(m)
    return m


class StreamedSource:
    """The model in ``path`` streamed from its safetensors files into ``output``; see the module."""

    holds_whole = False
    teacher: nn.Module | None = None  # the original is read again from disk, never held

    def __init__(
        self,
        path: Path,
        name: str,
        tokenizer: Any,
        data: DataOptions,
        output: Path,
        *,
        device: torch.device,
        dtype: str,
        budget: Budget,
        measuring: Measuring,
    ) -> None:
        self.path, self.name, self.tokenizer, self.data, self.output = path, name, tokenizer, data, output
        self.device, self.dtype, self.budget, self.measuring = device, dtype, budget, measuring
        self.spill_root: Path | None = None
        self.models: list[nn.Module] = []  # open streamed models, closed by `close`
        self.original_key: str | None = None  # the original's metrics in the cache

    def load(self) -> Any:
        return self.tokenizer

    def _open(self) -> nn.Module:
        model = open_streamed(self.path, resolve_dtype(self.dtype), self.device, self.spill_root)
        self.models.append(model)
        return model

    def open(self, keep_original: bool) -> nn.Module:
        self.output.resolve().parent.mkdir(parents=True, exist_ok=True)  # check_output_dir found it creatable
        clean_stale(self.output)  # what a killed run of the same output left
        self.spill_root = work_place(self.output, "stream")
        return self._open()

    def measure(self, model: nn.Module, ctx: Context, eval_data: TokenData | None) -> Measured:
        if eval_data is None:
            return Measured()
        data_key = f"{model_fingerprint(self.path)}:{self.dtype}:{eval_data.manifest.to_dict()}"
        hidden_key = hashlib.sha256(data_key.encode()).hexdigest()[:32]
        cached_hidden = _cached_hidden(hidden_key)
        original = self._open()
        progress = self.measuring.progress
        mine, theirs, hidden = evaluation.streamed_quality(
            model, eval_data.windows, reference=original, progress=progress, reference_hidden=cached_hidden
        )
        close(original)
        self.models.remove(original)
        assert theirs is not None and hidden is not None
        if cached_hidden is None:
            _store_hidden(hidden_key, hidden)
        self.original_key = hashlib.sha256(f"{data_key}:{self.measuring.speed}".encode()).hexdigest()[:32]
        return Measured({"original": {**(_cached(self.original_key) or {}), **theirs}, "compressed": mine})

    def save(self, model: nn.Module, tokenizer: Any, output: Path, meta: dict[str, Any], overwrite: bool) -> None:
        save_streamed_dir(model, tokenizer, output, {**meta, "streamed": True}, overwrite=overwrite)

    def measure_saved(self, measured: Measured, model: nn.Module, output: Path) -> None:
        """Sizes from the files; then speed and generation samples of each model that fits whole in
        the budget, one at a time (the original's speed from the cache when it was measured before)."""
        metrics = measured.metrics
        metrics["compressed"].update(streamed_size(model, output))
        metrics["original"].update(streamed_size(model_params_of(self.path, self.dtype), self.path))
        prompts = self.data.prompts(self.measuring.samples) if self.measuring.samples else []
        texts: dict[str, list[str]] = {}
        for role, where in (("original", self.path), ("compressed", output)):
            m = metrics[role]
            timed = not self.measuring.speed or "decode_tokens_per_s" in m  # the original's, from the cache
            if timed and not prompts:
                continue
            if not self.budget.holds_whole(weight_bytes(where)):
                log.warning(
                    "the %s model does not fit whole in the memory budget: speed and samples not measured", role
                )
                continue
            loaded = load_model(where, device=str(self.device))
            if not timed:
                vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
                m.update(evaluation.speed(loaded.model, vocab, **evaluation.speed_lengths(loaded.model)))
            if role == "original" and self.original_key:
                vs_reference = {"top1_agreement", "kl", "kl_median", "kl_p99", "kl_p999", "kl_max"}
                _store(self.original_key, {k: v for k, v in m.items() if k not in vs_reference})
            if prompts:
                texts[role] = evaluation.generate_samples(loaded.model, self.tokenizer, prompts)
            if role == "compressed":
                measured.model = loaded.model
            del loaded
        if len(texts) == 2:
            measured.samples = {"prompts": prompts, **texts}

    def close(self) -> None:
        """Remove the spills of every streamed model this source opened."""
        for m in self.models:
            close(m)
        self.models.clear()
        if self.spill_root is not None:
            shutil.rmtree(self.spill_root, ignore_errors=True)
