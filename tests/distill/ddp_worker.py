"""Run by test_ddp under ``torchrun``: train the test bigram model, rank 0 writes the parameters."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lmpress.distill.train import train, world
from tests.distill.test_train import Bigram, _cfg, _data

if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, size = world()
    m = Bigram()
    r = train(dict(m.named_parameters()), m.loss, _data(), _cfg(micro_batch_size=2))
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, sys.argv[1])
        print(f"world {size} steps {r.steps} tokens {r.tokens}")
    if dist.is_initialized():
        dist.destroy_process_group()
