"""`compress` for models bigger than memory: post-training stages, one block in memory at a time.

The same steps as `lmpress.pipeline.compress`, with the model streamed from its safetensors files
(`lmpress.streaming`): the stages run on a meta-device model whose blocks the calibration driver
brings in and writes out; the original is not copied but read again from disk, block by block,
beside the compressed model during evaluation (`lmpress.evaluation.streamed_quality`); the output's
shards are written unit by unit. Speed and generation samples need a whole model and are measured
after saving only when each model alone fits the memory budget. The original's own metrics and
its last hidden states on the evaluation windows are cached by model and data hash, so compressing
the same model again runs only the original's head (KL stays exact) and does not time it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmpress.errors import ModelLoadError
from lmpress.io import load_tokenizer, resolve_dtype
from lmpress.io.files import clean_stale, work_place
from lmpress.method import Context
from lmpress.recipe import Recipe

if TYPE_CHECKING:
    from lmpress.pipeline import DataOptions, Result

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
    from lmpress.io import write_json_atomic

    try:
        write_json_atomic(cache_dir() / "original-metrics" / f"{key}.json", metrics)
    except OSError as e:  # a read-only home is no reason to fail the run
        log.warning("cannot cache the original's metrics (%s)", e)


HIDDEN_CACHE_MAX = 2**31  # bytes of an original's last hidden states worth keeping


def _cached_hidden(key: str) -> list[torch.Tensor] | None:
    """The original's last hidden states on an evaluation set, from an earlier run (None if absent)."""
    from lmpress.streaming import read_header, read_tensor

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
    from safetensors.torch import save_file

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


def fits_whole(nbytes: int, budget: int) -> bool:
    """Whether a model of ``nbytes`` can be held whole (to time it, or to generate) under ``budget``."""
    from lmpress.memory import PROCESS_BYTES

    return PROCESS_BYTES + 1.3 * nbytes <= budget


def compress_streamed(
    path: Path,
    source: str,
    recipe: Recipe,
    data: DataOptions,
    *,
    output: Path,
    overwrite: bool,
    device: torch.device,
    dtype: str,
    run_eval: bool,
    measure_speed: bool,
    progress: bool,
    samples: int,
    budget: int,
    work_dir: Path | None,
    tokenizer: Any = None,
) -> Result:
    from lmpress.evaluation import streamed_quality
    from lmpress.io import save_streamed_dir
    from lmpress.pipeline import Result, run_stages
    from lmpress.streaming import close, open_streamed

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    if tokenizer is None:
        raise ModelLoadError(f"{source} has no tokenizer files; add them to the model directory")
    eval_data = data.load(tokenizer, "eval", data.eval_windows) if run_eval else None
    output.resolve().parent.mkdir(parents=True, exist_ok=True)  # check_output_dir found it creatable
    clean_stale(output)  # what a killed run of the same output left
    spill_root = work_place(output, "stream")
    model = original = None
    try:
        model = open_streamed(path, resolve_dtype(dtype), device, spill_root)
        ctx = Context(tokenizer=tokenizer, device=device, progress=progress, work_dir=work_dir)
        ctx.calibration = lambda: data.load(tokenizer, "calib", data.calib_windows)
        stages = run_stages(model, recipe, ctx)
        result = Result(None, tokenizer, recipe, stages, data=eval_data.manifest if eval_data else None)
        result.calibration = ctx.calib_manifest
        if int(os.environ.get("RANK", "0")) > 0:  # one of several torchrun processes: the first one measures and saves
            return result
        metrics: dict[str, dict[str, float]] = {}
        original_key = None
        if eval_data is not None:
            fingerprint = model_fingerprint(path)
            hidden_key = hashlib.sha256(f"{fingerprint}:{dtype}:{eval_data.manifest.to_dict()}".encode()).hexdigest()
            cached_hidden = _cached_hidden(hidden_key[:32])
            original = open_streamed(path, resolve_dtype(dtype), device, spill_root)
            mine, theirs, hidden = streamed_quality(
                model, eval_data.windows, reference=original, progress=progress, reference_hidden=cached_hidden
            )
            close(original)
            original = None
            assert theirs is not None and hidden is not None
            if cached_hidden is None:
                _store_hidden(hidden_key[:32], hidden)
            original_key = hashlib.sha256(
                f"{fingerprint}:{dtype}:{eval_data.manifest.to_dict()}:{measure_speed}".encode()
            ).hexdigest()[:32]
            metrics["original"] = {**(_cached(original_key) or {}), **theirs}
            metrics["compressed"] = mine
        meta = {
            "source_model": source,
            "recipe": recipe.to_dict(),
            "stages": stages,
            "metrics": metrics,
            "data": result.data.to_dict() if result.data else None,
            "calibration": ctx.calib_manifest,
            "streamed": True,
        }
        save_streamed_dir(model, tokenizer, output, meta, overwrite=overwrite)
        result.output = output
        if eval_data is not None:
            metrics["compressed"].update(streamed_size(model, output))
            metrics["original"].update(streamed_size(model_params_of(path, dtype), path))
    finally:
        for m in (model, original):
            if m is not None:
                close(m)
        shutil.rmtree(spill_root, ignore_errors=True)
    if eval_data is not None:
        _measure_whole(result, path, output, metrics, original_key, budget, measure_speed, samples, data, device)
        result.metrics = metrics
        from lmpress.io import update_meta

        update_meta(output, metrics=metrics)
    return result


def streamed_size(model: torch.nn.Module, where: Path) -> dict[str, float]:
    """`lmpress.evaluation.size` from the files: a streamed model is never whole in memory."""
    from lmpress.evaluation import bits_per_weight, count_parameters
    from lmpress.io import weight_bytes

    nbytes = weight_bytes(where)
    return {
        **bits_per_weight(count_parameters(model), count_parameters(model, dense=True), nbytes),
        "bytes": float(nbytes),
        "bytes_on_disk": float(nbytes),
        "weights_memory_mb": nbytes / 2**20,
    }


def model_params_of(path: Path, dtype: str) -> torch.nn.Module:
    """The architecture of ``path`` on the meta device (to count its parameters)."""
    from lmpress.streaming import close, open_streamed

    m = open_streamed(path, resolve_dtype(dtype))
    close(m)
    return m


def _measure_whole(
    result: Result,
    path: Path,
    output: Path,
    metrics: dict[str, dict[str, float]],
    original_key: str | None,
    budget: int,
    measure_speed: bool,
    samples: int,
    data: DataOptions,
    device: torch.device,
) -> None:
    """Speed and generation samples of each model that fits whole in ``budget``, one at a time."""
    from lmpress.evaluation import generate_samples, speed, speed_lengths
    from lmpress.io import load_model, weight_bytes

    prompts = data.prompts(samples) if samples else []
    texts: dict[str, list[str]] = {}
    for role, where in (("original", path), ("compressed", output)):
        m = metrics[role]
        timed = not measure_speed or "decode_tokens_per_s" in m  # the original's, from the cache
        if timed and not prompts:
            continue
        if not fits_whole(weight_bytes(where), budget):
            log.warning("the %s model does not fit whole in the memory budget: speed and samples not measured", role)
            continue
        loaded = load_model(where, device=str(device))
        if not timed:
            vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
            m.update(speed(loaded.model, vocab, **speed_lengths(loaded.model)))
        if role == "original" and original_key:
            _store(original_key, {k: v for k, v in m.items() if k not in ("kl", "top1_agreement")})
        if prompts:
            texts[role] = generate_samples(loaded.model, result.tokenizer, prompts)
        if role == "compressed":
            result._model = loaded.model
        del loaded
    if len(texts) == 2:
        result.samples = {"prompts": prompts, **texts}
