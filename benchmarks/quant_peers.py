"""Peer libraries on the same model, tokens and settings as `benchmarks/quant.py`.

Runs inside the separate, git-ignored peer environment (never lmpress's own dependencies):

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0
    .venv-peers/bin/pip install -c constraints.txt llmcompressor optimum-quanto torchao hqq   # torch pinned
    .venv-peers/bin/pip install --no-deps -e .          # lmpress's metric code only
    .venv/bin/python -m benchmarks.quant --export-data runs/bench/quant_data.safetensors
    .venv-peers/bin/python -m benchmarks.quant_peers --data runs/bench/quant_data.safetensors

Each peer quantizes a fresh copy of the built-in model; quality is measured with lmpress's own
`quality` on exactly the windows `quant.py` used, against the same original. Writes
``benchmarks/results/quant_peers.json``; `quant.py` merges it into its table. A peer that fails
is recorded with its error rather than dropped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmpress.evaluation import quality

MODEL = Path(__file__).parents[1] / "src/lmpress/models/builtin/reference"
OUT = Path(__file__).parent / "results" / "quant_peers.json"


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def llmcompressor_run(scheme: str, modifier: str, calib: torch.Tensor) -> Callable[[torch.nn.Module], Any]:
    def run(model: torch.nn.Module) -> Any:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        if modifier == "awq":  # on CPU its cache pins memory and crashes (../shared/PEERS.md)
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
        if modifier == "gptq":
            recipe = GPTQModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
        elif modifier == "awq":
            from llmcompressor.modifiers.awq import AWQModifier

            recipe = AWQModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
        else:
            recipe = QuantizationModifier(targets=["Linear"], scheme=scheme, ignore=["lm_head"])
        oneshot(
            model=model,
            dataset=ds,
            recipe=recipe,
            max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0],
        )

    return run


def quanto_run(bits: int) -> Callable[[torch.nn.Module], Any]:
    def run(model: torch.nn.Module) -> Any:
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(model, weights={8: qint8, 4: qint4}[bits], exclude=["lm_head"])
        freeze(model)

    return run


def torchao_run(kind: str) -> Callable[[torch.nn.Module], Any]:
    def run(model: torch.nn.Module) -> Any:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup

        config = {
            "int8": Int8WeightOnlyConfig(),
            "int4 g128": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)),
            "w8a8": Int8DynamicActivationInt8WeightConfig(),
        }[kind]
        quantize_(model, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head")

    return run


def hqq_run(bits: int, group: int) -> Callable[[torch.nn.Module], Any]:
    def run(model: torch.nn.Module) -> Any:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
        for name in _linear_names(model):
            parent, _, child = name.rpartition(".")
            lin = model.get_submodule(name)
            q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.bfloat16, device="cpu")
            setattr(model.get_submodule(parent), child, q)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated peer names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_file(args.data)
    eval_w, calib = data["eval"], data["calib"]
    original = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    peers: dict[tuple[str, str], Callable[[torch.nn.Module], Any]] = {
        ("llmcompressor rtn", "W4 g128"): llmcompressor_run("W4A16", "rtn", calib),
        ("llmcompressor gptq", "W4 g128"): llmcompressor_run("W4A16", "gptq", calib),
        ("llmcompressor awq", "W4 g128"): llmcompressor_run("W4A16", "awq", calib),
        ("llmcompressor gptq", "W8 per-channel"): llmcompressor_run("W8A16", "gptq", calib),
        ("quanto", "W8 per-channel"): quanto_run(8),
        ("quanto", "W4 g128"): quanto_run(4),
        ("torchao", "W8 per-channel"): torchao_run("int8"),
        ("torchao", "W4 g128"): torchao_run("int4 g128"),
        ("torchao", "W8A8"): torchao_run("w8a8"),
        ("hqq (library)", "W4 g128"): hqq_run(4, 128),
        ("hqq (library)", "W3 g128"): hqq_run(3, 128),
        ("hqq (library)", "W2 g64"): hqq_run(2, 64),
    }
    only = set(filter(None, args.only.split(",")))
    rows = []
    for (peer, setting), run in peers.items():
        if only and peer.split()[0] not in only and peer not in only:
            continue
        model = copy.deepcopy(original)
        t = time.perf_counter()
        try:
            run(model)
            seconds = time.perf_counter() - t
            q = quality(model, eval_w, reference=original, batch_size=16)
            rows.append({"method": peer, "setting": setting, **q, "quantize_seconds": seconds})
            print(f"{peer:20s} {setting:15s} ppl {q['perplexity']:.3f} kl {q['kl']:.4f} {seconds:.1f}s", flush=True)
        except Exception as e:  # a peer that fails is a result too
            rows.append({"method": peer, "setting": setting, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{peer:20s} {setting:15s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            traceback.print_exc(limit=2)
    versions = {}
    for name in ("llmcompressor", "optimum.quanto", "torchao", "hqq", "transformers", "torch"):
        try:
            versions[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception:
            versions[name] = None
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"versions": versions, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
