"""Knowledge distillation: a student learns to match a frozen teacher on unlabeled text.

The loss (Hinton et al. 2015, arXiv:1503.02531) is

    kl_weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T))
  + ce_weight · cross-entropy of the student on the text
  + hidden_weight · Σ_layers ‖P·h_student − h_teacher‖² / ‖h_teacher‖²

with a learned projection P per matched layer where the hidden widths differ (identity-initialised
where they agree), as in TinyBERT/MiniLM-style intermediate matching. Student layer j is matched to
the teacher layer at the same relative depth.

The recipe method ``distill`` trains the model being compressed (the student) against the original
(the teacher, optionally held quantized to save memory, or another model with the same tokenizer):
recovery after pruning, quantization or low rank, or the training of a smaller architecture derived
from the teacher. Compressed layers keep their format (`lmpress.distill.trainable`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmpress.distill.train import TrainConfig, TrainResult, train
from lmpress.distill.trainable import Codes, make_trainable, restore_compressed
from lmpress.errors import TrainError
from lmpress.evaluation import quality
from lmpress.io import load_model
from lmpress.method import Context, Method, MethodConfig, StageReport
from lmpress.quant import rtn

log = logging.getLogger(__name__)


# ---- the math ------------------------------------------------------------------------------------


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · KL(p_teacher,T ‖ p_student,T), mean over positions.  logits: (..., vocab)"""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (...,)
    return kl.mean() * temperature**2


def hidden_loss(student_h: Tensor, teacher_h: Tensor) -> Tensor:
    """‖h_s − h_t‖² / ‖h_t‖², so every layer counts the same whatever its scale.  h: (B, T, D)"""
    return (student_h.float() - teacher_h.float()).pow(2).sum() / teacher_h.float().pow(2).sum().clamp(min=1e-12)


def layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices at the same relative depth; index 0 is the embeddings."""
    return [(j, round(j * n_teacher / n_student)) for j in range(1, n_student + 1)]


def _hidden_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)  # type: ignore[union-attr,arg-type]


class Distiller(nn.Module):
    """Holds the student, the frozen teacher and the hidden-state projections; computes the loss."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        ce_weight: float = 0.0,
        hidden_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher]  # a list keeps it out of parameters() and state_dict()
        self.temperature, self.kl_weight, self.ce_weight, self.hidden_weight = (
            temperature,
            kl_weight,
            ce_weight,
            hidden_weight,
        )
        self.pairs: list[tuple[int, int]] = []
        self.proj = nn.ModuleList()
        if hidden_weight > 0:
            ns, nt = student.config.num_hidden_layers, teacher.config.num_hidden_layers  # type: ignore[union-attr]
            self.pairs = layer_pairs(int(ns), int(nt))  # type: ignore[arg-type]
            ds, dt = _hidden_width(student), _hidden_width(teacher)
            for _ in self.pairs:
                p = nn.Linear(ds, dt, bias=False)
                if ds == dt:
                    nn.init.eye_(p.weight)
                self.proj.append(p)

    def loss(self, ids: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The distillation loss on a batch of token windows (B, T)."""
        hidden = bool(self.pairs)
        with torch.no_grad():
            t_out = self.teacher[0](input_ids=ids, use_cache=False, output_hidden_states=hidden)
        s_out = self.student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        logits = s_out.logits[:, :-1]  # (B, T-1, V): positions that predict a next token
        parts: dict[str, Tensor] = {}
        if self.kl_weight:
            parts["kl"] = kd_kl(logits, t_out.logits[:, :-1], self.temperature)
        if self.ce_weight:
            parts["ce"] = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        if hidden:
            h = [
                hidden_loss(p(s_out.hidden_states[j]), t_out.hidden_states[i])
                for p, (j, i) in zip(self.proj, self.pairs, strict=True)
            ]
            parts["hidden"] = torch.stack(h).mean()
        weights = {"kl": self.kl_weight, "ce": self.ce_weight, "hidden": self.hidden_weight}
        total = sum(weights[k] * v for k, v in parts.items())
        assert isinstance(total, Tensor)
        return total, {k: float(v.detach()) for k, v in parts.items()}


# ---- the recipe method ---------------------------------------------------------------------------


class DistillConfig(MethodConfig, TrainConfig):
    """Train the model being compressed against a teacher; compressed layers keep their format."""

    method: Literal["distill"] = "distill"
    lr: float = Field(3e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    kl_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    codes: Codes = "frozen"  # quantized layers: keep the codes and learn the scales, or train them (QAT)
    scale_lr: float | None = Field(None, gt=0)  # learning rate of quantization scales (None: lr)
    lora_rank: int = Field(0, ge=0)  # > 0: freeze every weight and learn LoRA adapters instead
    # LoRA on quantized layers: keep the update beside the unchanged codes, or re-round it into them
    lora_merge: Literal["keep", "requantize"] = "keep"
    teacher: str | None = None  # None: the original model; else a model directory or built-in name
    teacher_bits: Literal[4, 8] | None = None  # hold the teacher quantized (round to nearest) to save memory
    train_windows: int | None = Field(None, ge=1)  # cap on the training windows used (None: the whole split)


def train_config(config: TrainConfig) -> TrainConfig:
    return TrainConfig(**config.model_dump(include=set(TrainConfig.model_fields)))


def _same_tokenizer(a: object, b: object) -> bool:
    get_a, get_b = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    return get_a is not None and get_b is not None and get_a() == get_b()


def load_teacher(config: DistillConfig, student: nn.Module, ctx: Context) -> nn.Module:
    """The frozen teacher in eval mode: the original, or ``config.teacher``; quantized if asked."""
    if config.teacher is not None:
        loaded = load_model(config.teacher, device=str(ctx.device))
        if loaded.tokenizer is None or not _same_tokenizer(loaded.tokenizer, ctx.tokenizer):
            raise TrainError(
                f"teacher {config.teacher!r} does not use the student's tokenizer; distillation compares "
                "token distributions, so give a teacher with the same tokenizer"
            )
        teacher = loaded.model
    elif ctx.teacher is not None:
        teacher = ctx.teacher
    else:
        raise TrainError("distill needs a teacher: the original model was not kept; give teacher: PATH")
    if teacher.config.vocab_size != student.config.vocab_size:  # type: ignore[union-attr]
        raise TrainError(
            f"teacher vocabulary {teacher.config.vocab_size} differs from the student's "  # type: ignore[union-attr]
            f"{student.config.vocab_size}; distillation needs the same tokenizer"  # type: ignore[union-attr]
        )
    if config.teacher_bits is not None:
        teacher = copy.deepcopy(teacher)
        held = rtn.RTNConfig(bits=config.teacher_bits, mse_clip=True)  # type: ignore[call-arg]
        rtn.apply(teacher, held, ctx)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def fingerprint(config: MethodConfig, model: nn.Module, data_hash: str) -> str:
    """What makes a training run the same run: its settings, its data and its starting weights."""
    with torch.no_grad():
        sums = [float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point()]
    blob = json.dumps([config.model_dump(mode="json"), data_hash, sums]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def distill_model(student: nn.Module, config: DistillConfig, ctx: Context, stage_name: str = "distill") -> TrainResult:
    """Distill ``student`` in place against the configured teacher; returns what training did."""
    train_data = ctx.train_data()
    windows = train_data.windows[: config.train_windows] if config.train_windows else train_data.windows
    teacher = load_teacher(config, student, ctx)
    dtype = next(student.parameters()).dtype
    run_dir = ctx.work_dir / stage_name if ctx.work_dir is not None else None
    fp = fingerprint(config, student, train_data.manifest.sha256)

    swapped = make_trainable(student, config.codes, config.lora_rank)
    student.float()
    distiller = Distiller(
        student, teacher, config.temperature, config.kl_weight, config.ce_weight, config.hidden_weight
    )
    distiller.to(ctx.device)
    named = _trainable_parameters(distiller, lora=config.lora_rank > 0)
    val = ctx.calib_data().windows[: config.eval_windows].to(ctx.device)

    def evaluate() -> float:
        student.eval()
        nll = quality(student, val, batch_size=8)["nll"]
        student.train()
        return nll

    student.train()
    try:
        result = train(
            named,
            distiller.loss,
            windows,
            train_config(config),
            eval_fn=evaluate,
            run_dir=run_dir,
            fingerprint=fp,
            progress=ctx.progress,
            lr_scale={n: config.scale_lr / config.lr for n in named if n.endswith(".scales")}
            if config.scale_lr
            else None,
        )
    finally:
        student.eval()
        restore_compressed(student, swapped, merge_quantized=config.lora_merge == "requantize")
        student.to(dtype)
        for p in student.parameters():
            p.requires_grad_(False)
    if run_dir is not None:
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # finished: only the curves stay
    return result


def _trainable_parameters(distiller: Distiller, lora: bool) -> dict[str, nn.Parameter]:
    """What the optimizer moves: every float parameter, or with LoRA only the adapters (and projections)."""
    named: dict[str, nn.Parameter] = {}
    for name, p in distiller.named_parameters():
        chosen = ("lora_" in name or name.startswith("proj.")) if lora else p.is_floating_point()
        p.requires_grad_(chosen)
        if chosen:
            named[name] = p
    return named


def apply(model: nn.Module, config: DistillConfig, ctx: Context) -> StageReport:
    result = distill_model(model, config, ctx)
    return {"training": result.to_dict(), "history": result.history}


METHOD = Method(
    "distill",
    DistillConfig,
    apply,
    "knowledge distillation / recovery training against the original (keeps formats)",
    needs_teacher=True,
)
