"""Run by `tests/test_distributed.py` under ``torchrun --nproc_per_node 2``: GPTQ on the built-in
model with the calibration windows split across the processes; rank 0 writes the result."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lmpress.data_options import DataOptions
from lmpress.pipeline import compress

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, recipe = Path(sys.argv[1]), sys.argv[2]
    r = compress("builtin", recipe, DataOptions(calib_windows=16, eval_windows=4), output=out, measure_speed=False)
    import torch.distributed as dist

    ppl = r.metrics["compressed"]["perplexity"] if r.metrics else 0.0
    print(f"rank {dist.get_rank()} world {dist.get_world_size()} calib_tokens {r.stages[0]['calib_tokens']} ppl {ppl}")
