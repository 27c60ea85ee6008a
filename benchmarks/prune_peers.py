"""llm-compressor's SparseGPT and Wanda on the same model, tokens and settings as `benchmarks/prune.py`.

Runs inside the separate, git-ignored peer environment (see `quant_peers.py` for its set-up):
    .venv/bin/python -m benchmarks.prune --export-data runs/bench/prune_data.safetensors
    .venv-peers/bin/python -m benchmarks.prune_peers --data runs/bench/prune_data.safetensors
Each run prunes a fresh copy of the built-in model; quality is measured with lmpress's own
`quality` on exactly the windows `prune.py` used. Writes ``benchmarks/results/prune_peers.json``;
`prune.py` merges it into its table. A run that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmpress.evaluation import count_parameters, quality

MODEL = Path(__file__).parents[1] / "src/lmpress/models/builtin/reference"
OUT = Path(__file__).parent / "results" / "prune_peers.json"


def llmcompressor_prune(model: torch.nn.Module, modifier: str, structure: str, calib: torch.Tensor) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[modifier]
    # targets must be a list, or the modifier silently prunes nothing (../shared/PEERS.md)
    recipe = cls(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=["lm_head"])
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(
        model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1], num_calibration_samples=calib.shape[0]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_file(args.data)
    eval_w, calib = data["eval"], data["calib"]
    original = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    rows: list[dict[str, Any]] = []
    for modifier in ("wanda", "sparsegpt"):
        for setting, structure in (("50% unstructured", "0:0"), ("2:4", "2:4")):
            name = f"llmcompressor {modifier}"
            model = copy.deepcopy(original)
            t = time.perf_counter()
            try:
                llmcompressor_prune(model, modifier, structure, calib)
                seconds = time.perf_counter() - t
                q = quality(model, eval_w, reference=original, batch_size=16)
                linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
                zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel() for m in linears)
                rows.append(
                    {
                        "method": name,
                        "setting": setting,
                        **q,
                        "prune_seconds": seconds,
                        "sparsity": zeros,
                        "dense_parameters": count_parameters(model),
                    }
                )
                print(
                    f"{name:24s} {setting:18s} ppl {q['perplexity']:.3f} sparsity {zeros:.3f} {seconds:.1f}s",
                    flush=True,
                )
            except Exception as e:  # a peer that fails is a result too
                rows.append({"method": name, "setting": setting, "error": f"{type(e).__name__}: {e}"[:300]})
                traceback.print_exc(limit=2)
    import llmcompressor

    args.out.parent.mkdir(exist_ok=True)
    payload = {"versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__}, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
