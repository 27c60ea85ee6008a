"""Speed and memory as a deployment sees them: prefill and decode tokens/s at batch 1 with the KV
cache, batched prefill, and the process's peak resident memory (or the CUDA allocator's) while
they run."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from lmpress.progress import phase


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Samples the process's resident memory in a background thread (Linux), in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def cache_name(model: nn.Module) -> str:
    """The forward's name for the KV cache, in and out: ``cache`` from transformers 5.25 (which
    warns on the older name), ``past_key_values`` before it and in lmpress's runtime models."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def speed(
    model: nn.Module,
    vocab_size: int,
    prompt_len: int = 128,
    decode_tokens: int = 64,
    batch: int = 8,
    repeats: int = 3,
) -> dict[str, float]:
    """Prefill and decode throughput (tokens/s) at batch 1 with the KV cache, plus batched prefill.

    Each figure is the best of ``repeats`` timed runs after one warm-up run. Peak memory is the
    process's resident set on CPU, or the CUDA allocator's peak on a GPU, during these runs.
    """
    with phase("measuring prefill and decode speed"):
        return _speed(model, vocab_size, prompt_len, decode_tokens, batch, repeats)


def _speed(
    model: nn.Module, vocab_size: int, prompt_len: int, decode_tokens: int, batch: int, repeats: int
) -> dict[str, float]:

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=gen).to(device)  # (1, P)
    batched = torch.randint(0, vocab_size, (batch, prompt_len), generator=gen).to(device)  # (B, P)

    def prefill(ids: Tensor) -> float:
        _sync(device)
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        return time.perf_counter() - t

    name = cache_name(model)

    def decode() -> float:
        out = model(input_ids=prompt, use_cache=True)
        past, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)  # tok: (1, 1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=tok, use_cache=True, **{name: past})
            past, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as mem:
        t_prefill = min(prefill(prompt) for _ in range(repeats + 1))
        t_batched = min(prefill(batched) for _ in range(repeats + 1))
        t_decode = min(decode() for _ in range(repeats + 1))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else mem.peak
    return {
        "prefill_tokens_per_s": prompt_len / t_prefill,
        "batched_prefill_tokens_per_s": batch * prompt_len / t_batched,
        "decode_tokens_per_s": decode_tokens / t_decode,
        "peak_memory_mb": peak / 2**20,
    }


def speed_lengths(model: nn.Module, prompt_len: int = 128, decode_tokens: int = 64) -> dict[str, int]:
    """Prompt and decode lengths that fit the model's position limit."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and prompt_len + decode_tokens > limit:
        prompt_len, decode_tokens = limit // 2, limit // 2
    return {"prompt_len": prompt_len, "decode_tokens": decode_tokens}
