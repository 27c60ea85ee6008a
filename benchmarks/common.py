"""Helpers shared by the benchmark scripts: data, timing, saving results, the README table."""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from lmpress.data import TokenData, load_windows
from lmpress.io import library_versions, save, weight_bytes

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parent / "README.md"


def machine() -> dict[str, Any]:
    """Where and how a benchmark ran: enough to judge whether two runs are comparable."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": library_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def split_windows(tokenizer: Any, split: str, n: int, seq_len: int = 256) -> TokenData:
    return load_windows(tokenizer, "stdlib", split, seq_len, n)  # type: ignore[arg-type]


def export_windows(path: Path, eval_data: TokenData, calib: TokenData) -> None:
    """Write the evaluation and calibration windows for a peer script in the peer environment."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"eval": eval_data.windows.contiguous(), "calib": calib.windows.contiguous()}, path)


def saved_bytes(model: torch.nn.Module, tokenizer: Any) -> int:
    """Bytes of the weight files when this model is saved by lmpress."""
    with tempfile.TemporaryDirectory() as d:
        out = save(model, tokenizer, Path(d) / "m")
        return weight_bytes(out)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    """Write ``results/NAME.json`` and replace NAME's section of the benchmarks README."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.exists() else "# lmpress benchmarks\n"
    block = f"{start}\n{table.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def keep_other_groups(name: str, payload: dict[str, Any], rerun: Sequence[str], order: Sequence[str]) -> dict[str, Any]:
    """Merge the rows of groups not re-run from the previous ``results/NAME.json``, when it was
    measured on the same evaluation windows (row 0, the reference, is this run's). Returns the
    previous payload (empty if none or not comparable) for anything else worth carrying over."""
    path = RESULTS / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous.get("eval") != payload["eval"]:
        return {}
    rows = payload["rows"]
    kept = [r for r in previous.get("rows", [])[1:] if r["group"] not in rerun]
    payload["rows"] = [rows[0], *sorted(rows[1:] + kept, key=lambda r: list(order).index(r["group"]))]
    return previous


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


MODELS = {
    "builtin": "Built-in model",
    "smollm2": "SmolLM2-135M-Instruct (real, converted from its Q4_1 GGUF: 4-bit g32 flatters every method)",
}


def bench_model(name: str) -> Any:
    """The model a quality benchmark runs on: ``builtin`` or ``smollm2`` (`benchmarks/real_model.py`)."""
    from lmpress.io.load import load_model

    if name == "smollm2":
        from benchmarks.real_model import obtain

        return load_model(obtain())
    return load_model(name)


def results_name(base: str, model: str) -> str:
    """The results file and README section of a benchmark run on ``model``: ``quant``, ``quant_smollm2``."""
    return base if model == "builtin" else f"{base}_{model}"
