"""The training loop every recovery, distillation and QAT stage runs: one small, readable loop.

What it does, in order, for each optimizer step: take the step's batch (a deterministic function of
the seed and the step, so a resumed run sees exactly the batches it would have seen), split it over
the processes and into micro-batches, run forward and backward under autocast (bf16 on CPU; bf16,
or fp16 with a grad scaler, on CUDA), all-reduce the gradients, clip them, and step AdamW at the
learning rate of a linear warm-up plus cosine decay. Every ``eval_every`` steps it measures the
held-out loss, keeps the best parameters, stops early after ``patience`` evaluations without
improvement, logs TensorBoard scalars and writes a checkpoint.

Checkpoints (`lmpress.distill.checkpoint`) are safetensors (trainable parameters, their best values
and AdamW's moments) plus a JSON file (step, schedule, history and the run's fingerprint); nothing
is pickled. Resuming checks the fingerprint, so a checkpoint of another run is refused instead of
silently continued.

Data parallel: start the same program with ``torchrun --nproc_per_node N``; the loop joins the
process group (gloo on CPU, NCCL on CUDA) and each process takes its share of every batch. The
gradients are summed over processes, so N processes compute the same step as one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from lmpress.distill.checkpoint import load_checkpoint, save_checkpoint
from lmpress.errors import TrainError
from lmpress.progress import track

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
LossFn = Callable[[Tensor], tuple[Tensor, dict[str, float]]]  # batch (B, T) -> loss, extra scalars


class TrainConfig(BaseModel):
    """How to train: budget, batch, schedule, precision, evaluation and checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1)  # optimizer steps
    batch_size: int = Field(16, ge=1)  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = Field(None, ge=1)  # sequences per forward; None: the whole share
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup: float = Field(0.05, ge=0, lt=1)  # share of the steps spent warming up
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 (fp16 on old GPUs)
    eval_every: int = Field(50, ge=1)
    eval_windows: int = Field(32, ge=1)  # held-out windows measured at each evaluation
    patience: int | None = Field(None, ge=1)  # evaluations without improvement before stopping
    keep_best: bool = True  # end with the parameters of the best evaluation
    checkpoint_every: int | None = Field(None, ge=1)  # None: at every evaluation
    seed: int = 0


@dataclass
class TrainResult:
    """What a training run did."""

    steps: int
    tokens: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_eval: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "final_loss": last.get("loss"),
            "best_eval_loss": self.best_eval,
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
        }


# ---- pure helpers --------------------------------------------------------------------------------


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(data: Tensor, step: int, batch_size: int, seed: int) -> Tensor:
    """The batch of ``step``: epochs are seeded permutations of the windows.  (batch, T)"""
    per_epoch = data.shape[0] // batch_size
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return data[order[i * batch_size : (i + 1) * batch_size]]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device; None for full fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        cuda_bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ---- processes -----------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by ``torchrun``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(tensors: list[Tensor]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


# ---- the loop ------------------------------------------------------------------------------------


def train(
    named: dict[str, nn.Parameter],
    loss_fn: LossFn,
    data: Tensor,
    cfg: TrainConfig,
    *,
    eval_fn: Callable[[], float] | None = None,
    run_dir: Path | None = None,
    fingerprint: str = "",
    resume: bool = True,
    progress: bool = False,
    lr_scale: dict[str, float] | None = None,
) -> TrainResult:
    """Train the parameters ``named`` to lower ``loss_fn`` on batches of ``data`` (N, T) token windows.

    ``lr_scale`` multiplies the learning rate of the parameters it names (default 1); matrices get
    ``weight_decay``, vectors do not.

    ``eval_fn`` returns a held-out loss (lower is better) for evaluation, best-keeping and early
    stopping. With ``run_dir`` the loop writes checkpoints and TensorBoard scalars there and, when
    ``resume``, continues from the checkpoint it finds (refusing one whose fingerprint differs).
    """
    rank, size = world()
    share, micro = _shares(data, cfg, size)
    if not named:
        raise TrainError("nothing to train: the model has no trainable parameters")
    params = list(named.values())
    device = params[0].device
    amp = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    opt = _optimizer(named, cfg, lr_scale)
    warmup = max(1, int(cfg.warmup * cfg.steps))
    every = cfg.checkpoint_every or cfg.eval_every

    result = TrainResult(steps=0, tokens=0, seconds=0.0)
    best: dict[str, Tensor] | None = None
    bad_evals, start = 0, 0
    ckpt = run_dir / CHECKPOINT if run_dir is not None else None
    if ckpt is not None and resume and (ckpt / "trainer.json").exists():
        start, bad_evals, best = _resume(ckpt, named, opt, fingerprint, result)
        log.info("resuming from step %d of %d (%s)", start, cfg.steps, ckpt)
    writer = _tensorboard(run_dir) if run_dir is not None and rank == 0 else None

    t0 = time.perf_counter() - result.seconds
    done = start
    for step in track(range(start, cfg.steps), "training", enabled=progress and rank == 0, total=cfg.steps - start):
        lr = lr_at(step, cfg.steps, cfg.lr, warmup, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        rows = batch_at(data, step, cfg.batch_size, cfg.seed)[rank * share : (rank + 1) * share].to(device)
        totals, extras = _step(loss_fn, rows, micro, cfg, params, opt, scaler, amp)
        result.tokens += rows.numel() * size
        done = step + 1
        if writer is not None:
            writer.add_scalar("train/loss", float(totals), done)
            writer.add_scalar("train/lr", lr, done)
            for k, v in extras.items():
                writer.add_scalar(f"train/{k}", v, done)

        if done % cfg.eval_every == 0 or done == cfg.steps:
            row: dict[str, float] = {"step": done, "loss": float(totals), "lr": lr, **extras}
            best, bad_evals = _evaluate(row, done, eval_fn, named, cfg, result, best, bad_evals, writer)
        stop = cfg.patience is not None and bad_evals >= cfg.patience
        if ckpt is not None and rank == 0 and (done % every == 0 or done == cfg.steps or stop):
            result.seconds = time.perf_counter() - t0
            save_checkpoint(ckpt, named, best, opt, _meta(fingerprint, done, bad_evals, result))
        if stop:
            result.stopped_early = True
            log.info("stopping early at step %d: %d evaluations without improvement", done, bad_evals)
            break
    result.steps = done
    result.seconds = time.perf_counter() - t0
    if best is not None and cfg.keep_best:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best[n])
    if writer is not None:
        writer.close()
    return result


def _shares(data: Tensor, cfg: TrainConfig, size: int) -> tuple[int, int]:
    """(sequences per process, sequences per forward) of a batch; refuses data or batches that do not split."""
    if data.shape[0] < cfg.batch_size:
        raise TrainError(
            f"the training data has {data.shape[0]} windows of {data.shape[1]} tokens, fewer than one "
            f"batch of {cfg.batch_size}; give more text or a smaller batch_size"
        )
    if cfg.batch_size % size:
        raise TrainError(f"batch_size {cfg.batch_size} does not split over {size} processes; make it a multiple")
    share = cfg.batch_size // size
    return share, min(cfg.micro_batch_size or share, share)


def _optimizer(
    named: dict[str, nn.Parameter], cfg: TrainConfig, lr_scale: dict[str, float] | None
) -> torch.optim.AdamW:
    """AdamW, one group per (decayed or not, learning-rate multiplier); each keeps its ``lr_scale``."""
    by_kind: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in named.items():
        matrix = p.ndim >= 2 and not name.endswith("scales")  # quantization scales are not decayed
        by_kind.setdefault((matrix, (lr_scale or {}).get(name, 1.0)), []).append(p)
    groups = [
        {"params": ps, "weight_decay": cfg.weight_decay if matrix else 0.0, "lr_scale": mult}
        for (matrix, mult), ps in by_kind.items()
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _resume(
    ckpt: Path, named: dict[str, nn.Parameter], opt: torch.optim.Optimizer, fingerprint: str, result: TrainResult
) -> tuple[int, int, dict[str, Tensor] | None]:
    """Load the checkpoint into the parameters, ``opt`` and ``result``: (start step, bad evaluations, best)."""
    meta, best = load_checkpoint(ckpt, named, opt, fingerprint)
    start, bad_evals = int(meta["step"]), int(meta["bad_evals"])
    result.history, result.best_eval = meta["history"], meta["best_eval"]
    result.tokens, result.seconds, result.resumed_from = int(meta["tokens"]), float(meta["seconds"]), start
    return start, bad_evals, best


def _step(
    loss_fn: LossFn,
    rows: Tensor,
    micro: int,
    cfg: TrainConfig,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    amp: torch.dtype | None,
) -> tuple[Tensor, dict[str, float]]:
    """One optimizer step on this process's ``rows`` (share, T), in micro-batches of ``micro``: the
    batch's mean loss over all processes (1,) and the loss function's extra scalars."""
    device, share = rows.device, rows.shape[0]
    totals = torch.zeros(1, device=device)
    extras: dict[str, float] = {}
    for mb in rows.split(micro):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, extra = loss_fn(mb)
        weight = mb.shape[0] / cfg.batch_size  # the global batch mean, whatever the split
        (scaler.scale(loss * weight) if scaler else loss * weight).backward()
        totals += loss.detach().float() * weight
        for k, v in extra.items():
            extras[k] = extras.get(k, 0.0) + v * mb.shape[0] / share
    grads = [p.grad for p in params if p.grad is not None]
    _sum_over_processes([*grads, totals])
    if scaler is not None:
        scaler.unscale_(opt)
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return totals, extras


def _evaluate(
    row: dict[str, float],
    done: int,
    eval_fn: Callable[[], float] | None,
    named: dict[str, nn.Parameter],
    cfg: TrainConfig,
    result: TrainResult,
    best: dict[str, Tensor] | None,
    bad_evals: int,
    writer: Any,
) -> tuple[dict[str, Tensor] | None, int]:
    """Add the step's ``row`` to the history, with the held-out loss when there is an ``eval_fn``:
    the best parameters and the evaluations without improvement after it."""
    if eval_fn is not None:
        ev = eval_fn()
        row["eval_loss"] = ev
        if result.best_eval is None or ev < result.best_eval:
            result.best_eval, bad_evals = ev, 0
            best = {n: p.detach().clone() for n, p in named.items()} if cfg.keep_best else None
        else:
            bad_evals += 1
        if writer is not None:
            writer.add_scalar("eval/loss", ev, done)
    result.history.append(row)
    log.info("step %d/%d %s", done, cfg.steps, " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
    return best, bad_evals


def _meta(fingerprint: str, step: int, bad_evals: int, result: TrainResult) -> dict[str, Any]:
    """The checkpoint's JSON: where the run stands, and whose run it is."""
    return {
        "fingerprint": fingerprint,
        "step": step,
        "bad_evals": bad_evals,
        "best_eval": result.best_eval,
        "history": result.history,
        "tokens": result.tokens,
        "seconds": result.seconds,
    }


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install only loses the curves
        log.warning("tensorboard is not importable; training curves are not logged")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
