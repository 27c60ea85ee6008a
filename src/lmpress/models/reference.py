"""The built-in reference model: a small Llama that lmpress trains itself on the stdlib corpus.

Nothing can be downloaded, so lmpress trains its own test bed: a byte-level BPE tokenizer and a
``LlamaForCausalLM`` (grouped-query attention, untied head, widths multiples of 128) on the train
split of the Python standard library's source, for many tokens per parameter so that compression
shows on it. Run it with ``lmpress train-reference --out runs/reference`` (about 90 minutes on 2
CPU cores; ``--device cuda`` when a GPU is there). The shipped checkpoint lives in
``lmpress/models/builtin/reference``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmpress.data import manifest, select_split, tokenize_documents, windows
from lmpress.distill.train import lr_at
from lmpress.evaluation import quality
from lmpress.progress import track
from lmpress.sources import Document, load_documents

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ReferenceSpec:
    """Everything that decides the reference model: architecture, tokenizer and training."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 32
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    tokens: int | None = None  # training tokens; None: as many as `minutes` allow
    minutes: float = 90.0
    eval_every: int = 200
    eval_windows: int = 64


def train_tokenizer(docs: list[Document], vocab_size: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens) trained on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def llama_config(spec: ReferenceSpec, eos_id: int):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.seq_len * 4,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )


def epoch_batches(stream: Tensor, seq_len: int, batch_size: int, gen: torch.Generator) -> Tensor:
    """One epoch of shuffled windows from a random start offset.  (steps, B, T)"""
    offset = int(torch.randint(0, seq_len, (1,), generator=gen))
    w = windows(stream[offset:], seq_len)  # (N, T)
    w = w[torch.randperm(w.shape[0], generator=gen)]
    n = w.shape[0] // batch_size
    return w[: n * batch_size].view(n, batch_size, seq_len)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: Tensor, spec: ReferenceSpec, device: str) -> float:
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _throughput(model: torch.nn.Module, spec: ReferenceSpec, device: str) -> float:
    """Training tokens per second, measured on a throw-away copy of the model and optimizer."""
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), device=device)
    _step(m, opt, ids, spec, device)
    t = time.perf_counter()
    for _ in range(4):
        _step(m, opt, ids, spec, device)
    return 4 * ids.numel() / (time.perf_counter() - t)


def train_reference(spec: ReferenceSpec, out: Path, device: str = "cpu", progress: bool = True) -> dict[str, object]:
    """Train tokenizer and model on the stdlib train split; save a bf16 checkpoint to ``out``.

    Returns what the card needs: spec, parameters, tokens, epochs, time, manifest, eval history.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    docs = load_documents("stdlib")
    train_docs, eval_docs = select_split(docs, "train"), select_split(docs, "eval")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, spec.vocab_size)
    train_stream = tokenize_documents(train_docs, tokenizer)
    eval_w = windows(tokenize_documents(eval_docs, tokenizer), spec.seq_len)
    log.info(
        "tokenizer %.0fs; train tokens %d, eval windows %d", time.perf_counter() - t0, train_stream.numel(), len(eval_w)
    )

    model = LlamaForCausalLM(llama_config(spec, tokenizer.eos_token_id))
    model.to(device)  # type: ignore[arg-type]
    n_params = sum(p.numel() for p in model.parameters())
    tok_per_step = spec.batch_size * spec.seq_len
    if spec.tokens is None:
        tps = _throughput(model, spec, device)
        total_steps = int(spec.minutes * 60 * tps / tok_per_step)
        log.info("measured %.0f tokens/s: %d steps fit %.0f minutes", tps, total_steps, spec.minutes)
    else:
        total_steps = spec.tokens // tok_per_step
    t_train = time.perf_counter()
    history = _train(model, train_stream, eval_w, spec, total_steps, device, progress)
    train_minutes = (time.perf_counter() - t_train) / 60

    info = {
        "spec": asdict(spec),
        "parameters": n_params,
        "train_tokens": total_steps * tok_per_step,
        "train_unique_tokens": int(train_stream.numel()),
        "epochs": total_steps * tok_per_step / train_stream.numel(),
        "steps": total_steps,
        "train_minutes": train_minutes,
        "device": device,
        "threads": torch.get_num_threads(),
        "train_manifest": manifest(train_docs, "stdlib", "train").to_dict(),
        "history": history,
    }
    save_checkpoint(model, tokenizer, info, out)
    return info


def _optimizer(model: torch.nn.Module, spec: ReferenceSpec) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms and biases)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.peak_lr, betas=(0.9, 0.95), fused=False)


def _train(
    model: torch.nn.Module,
    train_stream: Tensor,
    eval_w: Tensor,
    spec: ReferenceSpec,
    total_steps: int,
    device: str,
    progress: bool,
) -> list[dict[str, float]]:
    """``total_steps`` steps on shuffled epochs of ``train_stream``; returns the evaluation history."""
    opt = _optimizer(model, spec)
    warmup = max(1, int(spec.warmup_fraction * total_steps))
    gen = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = []
    step, epoch, t_train = 0, 0, time.perf_counter()
    batches = epoch_batches(train_stream, spec.seq_len, spec.batch_size, gen)
    model.train()
    for step in track(range(total_steps), "training", enabled=progress):
        if step and step % len(batches) == 0:
            epoch += 1
            batches = epoch_batches(train_stream, spec.seq_len, spec.batch_size, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, spec.peak_lr, warmup, spec.min_lr_ratio)
        loss = _step(model, opt, batches[step % len(batches)].to(device), spec, device)
        if (step + 1) % spec.eval_every == 0 or step + 1 == total_steps:
            model.eval()
            ev = quality(model, eval_w[: spec.eval_windows].to(device), batch_size=16)
            model.train()
            row = {
                "step": step + 1,
                "epoch": epoch,
                "train_loss": loss,
                "eval_ppl": ev["perplexity"],
                "minutes": (time.perf_counter() - t_train) / 60,
            }
            history.append(row)
            log.info(
                "step %d/%d epoch %d loss %.3f eval ppl %.2f (%.1f min)",
                step + 1,
                total_steps,
                epoch,
                loss,
                ev["perplexity"],
                row["minutes"],
            )
    return history


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, info: dict[str, object], out: Path) -> None:
    """Write the bf16 checkpoint, tokenizer and ``training.json`` into ``out``."""
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    tokenizer.model_max_length = int(info["spec"]["seq_len"]) * 4  # type: ignore[index]
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
