"""llm-compressor's own compressed-tensors checkpoint of the built-in model, for `benchmarks/export.py`.

Runs inside the separate, git-ignored peer environment (see `benchmarks/quant_peers.py` for its
set-up; llm-compressor pins an older transformers):

    .venv/bin/python -m benchmarks.export --export-data runs/bench/export_data.safetensors
    .venv-peers/bin/python -m benchmarks.export_peers --data runs/bench/export_data.safetensors \
        --out runs/bench/llmcompressor-w4a16
    .venv/bin/python -m benchmarks.export --peer-dir runs/bench/llmcompressor-w4a16

The recipe is llm-compressor's W4A16 preset (4-bit symmetric, groups of 128, GPTQ, the head
ignored) on exactly the calibration windows lmpress's GPTQ uses in `export.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = Path(__file__).parents[1] / "src/lmpress/models/builtin/reference"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.quant_peers import llmcompressor_run  # the same oneshot call quant_peers.py measures

    calib = load_file(args.data)["calib"]
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)
    llmcompressor_run("W4A16", "gptq", calib)(model)
    model.save_pretrained(args.out, save_compressed=True)
    AutoTokenizer.from_pretrained(MODEL).save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
