"""Federated recovery without the transport: what a client does in a round, and how the server
combines what the clients send back.

A client holds the compressed student (the same directory as the server's), the teacher and its
own text. Each round it receives the trainable parameters of the global model (LoRA adapters,
quantization scales, or the float weights a recipe keeps trainable, never frozen codes), evaluates
them on its held-out split, trains ``local_steps`` on its training split against the teacher
(distillation, with FedProx's proximal term when asked), and returns the new parameters with the
number of tokens it trained on. The server averages them weighted by tokens (FedAvg, also the
aggregation of FedProx) or moves the global model with Adam along the average change (FedAdam,
Reddi et al. 2021, arXiv:2003.00295). `lmpress.federated.server_app` and `client_app` carry these over
Flower.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from lmpress.data import content_hash, select_split, tokenize_documents, windows
from lmpress.distill.distill import DistillConfig, Distiller, _trainable_parameters, load_teacher, train_config
from lmpress.distill.train import TrainConfig, TrainError, lr_at, train
from lmpress.distill.trainable import TrainableLinear, make_trainable, restore_compressed
from lmpress.io import load_model
from lmpress.method import Context, MethodConfig
from lmpress.sources import load_documents


class LocalDP(BaseModel):
    """Local differential privacy of each client's update, by Flower's ``LocalDpMod``: the update
    (new parameters minus the ones received) is clipped to L2 norm ``clip`` and Gaussian noise of
    standard deviation ``2 clip sqrt(2 ln(1.25 / delta)) / epsilon`` is added before it leaves the
    client (the Gaussian mechanism, Dwork and Roth 2014, Thm. A.1; two clipped updates differ by at
    most ``2 clip``). Each round is (epsilon, delta)-DP for the client's data; over R rounds the
    basic composition gives (R epsilon, R delta)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(1.0, gt=0)  # L2 norm bound of a client's update in a round
    epsilon: float = Field(gt=0)  # per round
    delta: float = Field(1e-5, gt=0, lt=1)  # per round

    def noise_std(self) -> float:
        return 2 * self.clip * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


class FederatedConfig(MethodConfig):
    """Run a distillation stage as federated rounds over clients that keep their data."""

    method: Literal["federated"] = "federated"
    # the distillation each client runs (distill's keys; default LoRA rank 8 on frozen codes)
    train: DistillConfig = Field(default_factory=lambda: DistillConfig.model_validate({"lora_rank": 8}))
    rounds: int = Field(5, ge=1)  # server rounds: send, train locally, aggregate
    local_steps: int = Field(20, ge=1)  # optimizer steps per client per round
    aggregation: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"  # the server's update rule
    prox_mu: float = Field(0.01, ge=0)  # FedProx: weight of ||w - w_global||^2 / 2 in each client's loss
    server_lr: float = Field(1e-2, gt=0)  # FedAdam's step
    # FedAvg/FedProx: the global model moves this many times the clients' mean change (server SGD,
    # FedOpt; 1: plain FedAvg)
    server_step: float = Field(1.0, gt=0)
    min_clients: int = Field(2, ge=1)  # a round needs this many replies
    seq_len: int = Field(256, ge=8)  # tokens per window of each client's text
    eval_windows: int = Field(16, ge=1)  # each client's held-out windows per evaluation
    secure_aggregation: bool = False  # Flower's SecAgg+: the server sees only the clients' weighted mean
    secagg_threshold: float = Field(0.5, gt=0, le=1)  # SecAgg+ unmasks while this share of the clients remains
    dp: LocalDP | None = None  # local differential privacy of every update (Flower's LocalDpMod)
    # LoRA: keep every client's A at the same seeded random start and train only B (FFA-LoRA, Sun et
    # al. 2024, arXiv:2403.12313): the mean of the clients' B A is then exactly the mean B times A,
    # and half the adapter bytes travel
    freeze_lora_a: bool = False

    @model_validator(mode="after")
    def _lora_to_freeze(self) -> FederatedConfig:
        if self.freeze_lora_a and self.train.lora_rank <= 0:
            raise ValueError("freeze_lora_a trains only LoRA's B: give train.lora_rank > 0")
        return self


def encode_config(config: FederatedConfig) -> str:
    """The stage's config as one run-config value (Flower's run config has no quoting for JSON)."""
    return base64.urlsafe_b64encode(config.model_dump_json().encode()).decode()


def decode_config(value: str) -> FederatedConfig:
    """The stage's config back from `encode_config`'s value."""
    return FederatedConfig.model_validate_json(base64.urlsafe_b64decode(value))


# ---- the client's side ----------------------------------------------------------------------------


def check_clients(clients: list[Path], config: FederatedConfig) -> None:
    """Before any work: enough client directories, each with text."""
    if len(clients) < config.min_clients:
        raise TrainError(
            f"the federated stage has {len(clients)} client directories, fewer than min_clients "
            f"{config.min_clients}; pass more with --clients or lower min_clients"
        )
    for c in clients:
        if not c.is_dir():
            raise TrainError(f"client data {c} is not a directory; give each client a directory of text files")
        if not any(p.is_file() and p.stat().st_size for p in c.rglob("*")):
            raise TrainError(f"client data {c} has no text; give each client a directory of text files")


@dataclass
class ClientData:
    """One client's token windows: training and held-out, with what they were cut from."""

    train: Tensor  # (N, T)
    held_out: Tensor  # (M, T)
    tokens: int
    sha256: str


def client_data(tokenizer: Any, source: Path, seq_len: int, eval_windows: int) -> ClientData:
    """The client's text split as lmpress splits any source (by document); a client whose few
    documents all fall in the training split holds out its last windows instead (a tenth, at
    least one, at most ``eval_windows``)."""
    docs = load_documents(source)
    if not any(d.text.strip() for d in docs):
        raise TrainError(f"client data {source} has no text; give each client a directory of text files")
    train_docs, held_docs = select_split(docs, "train"), select_split(docs, "eval")
    train_w = windows(tokenize_documents(train_docs or docs, tokenizer), seq_len)
    if held_docs:
        held = windows(tokenize_documents(held_docs, tokenizer), seq_len, eval_windows)
    else:
        n = min(eval_windows, max(1, train_w.shape[0] // 10))
        train_w, held = train_w[:-n], train_w[-n:]
    if train_w.shape[0] < 1 or held.shape[0] < 1:
        raise TrainError(f"client data {source} has fewer than two windows of {seq_len} tokens; give it more text")
    return ClientData(train_w, held, int(train_w.numel()), content_hash(docs))


class Student:
    """The compressed model made trainable once, with its teacher, for many rounds."""

    def __init__(self, model: nn.Module, config: DistillConfig, ctx: Context, freeze_lora_a: bool = False) -> None:
        self.model = model
        self.config = config
        teacher = load_teacher(config, model, ctx)
        self.dtype = next(model.parameters()).dtype
        with torch.random.fork_rng():  # the same initial adapters in every process and every run
            torch.manual_seed(0)
            self.swapped = make_trainable(model, config.codes, config.lora_rank)
        model.float()
        self.distiller = Distiller(
            model, teacher, config.temperature, config.kl_weight, config.ce_weight, config.hidden_weight
        ).to(ctx.device)
        self.named = _trainable_parameters(self.distiller, lora=config.lora_rank > 0)
        if freeze_lora_a:  # A stays at its seeded start, the same in every process: only B trains and travels
            for name in [n for n in self.named if n.rsplit(".", 1)[-1] == "lora_a"]:
                self.named.pop(name).requires_grad_(False)
        # a sparse layer's latent weight is dense with its mask fixed: only the kept weights travel
        self.masks = {
            f"{name}.weight": m.mask
            for name, m in self.distiller.named_modules()
            if isinstance(m, TrainableLinear) and m.mask is not None and f"{name}.weight" in self.named
        }
        self.device = ctx.device

    def state(self) -> dict[str, Tensor]:
        """The trainable parameters, detached copies on CPU (what travels; a sparse layer's kept
        weights as one vector in the mask's order)."""
        return {
            n: (p[self.masks[n]] if n in self.masks else p).detach().float().cpu().clone()
            for n, p in self.named.items()
        }

    def wire_shape(self, name: str) -> tuple[int, ...]:
        p = self.named[name]
        return (int(self.masks[name].sum()),) if name in self.masks else tuple(p.shape)

    def load(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.named) or any(tuple(state[n].shape) != self.wire_shape(n) for n in self.named):
            missing, extra = sorted(set(self.named) - set(state)), sorted(set(state) - set(self.named))
            raise TrainError(
                f"the parameters sent do not fit this model (missing {missing[:3]}, unknown {extra[:3]}, or "
                "other shapes); server and clients must start from the same compressed model and recipe"
            )
        with torch.no_grad():
            for n, p in self.named.items():
                if n in self.masks:
                    p.zero_().masked_scatter_(self.masks[n], state[n].to(p.device, p.dtype))
                else:
                    p.copy_(state[n].to(p.device, p.dtype))

    def loss(self, windows: Tensor) -> float:
        """Mean distillation loss on held-out ``windows`` (what the stage minimizes)."""
        self.model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, windows.shape[0], 8):
                batch = windows[i : i + 8].to(self.device)
                value, _ = self.distiller.loss(batch)
                total += float(value) * batch.shape[0]
                n += batch.shape[0]
        return total / max(n, 1)

    def fit(self, windows: Tensor, steps: int, lr: float, seed: int, prox_mu: float = 0.0) -> tuple[float, int]:
        """``steps`` local optimizer steps from the current parameters: (last loss, tokens trained on)."""
        anchor = {n: p.detach().clone() for n, p in self.named.items()} if prox_mu else {}

        def loss_fn(ids: Tensor) -> tuple[Tensor, dict[str, float]]:
            value, parts = self.distiller.loss(ids)
            if prox_mu:
                prox = sum(((p - anchor[n]) ** 2).sum() for n, p in self.named.items())
                value = value + prox_mu / 2 * prox
            return value, parts

        cfg = TrainConfig(
            **{
                **train_config(self.config).model_dump(),
                "steps": steps,
                "lr": lr,
                "warmup": 0.0,
                "min_lr_ratio": 1.0,
                "eval_every": steps + 1,
                "keep_best": False,
                "seed": seed,
                "batch_size": min(self.config.batch_size, windows.shape[0]),
            }
        )
        self.model.train()
        result = train(self.named, loss_fn, windows, cfg, resume=False)
        self.model.eval()
        return (float(result.history[-1]["loss"]) if result.history else float("nan")), result.tokens

    def finish(self) -> None:
        """Back to the compressed formats (LoRA kept beside the codes, or merged), in the model's dtype."""
        self.model.eval()
        restore_compressed(self.model, self.swapped, merge_quantized=self.config.lora_merge == "requantize")
        self.model.to(self.dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)


def round_lr(config: FederatedConfig, server_round: int) -> float:
    """The learning rate of a round: the wrapped stage's warm-up and cosine schedule over all rounds."""
    total = config.rounds * config.local_steps
    step = (server_round - 1) * config.local_steps
    warmup = int(config.train.warmup * total)
    return lr_at(step, total, config.train.lr, warmup, config.train.min_lr_ratio)


def fingerprint_model(model: nn.Module, tokenizer: Any) -> str:
    """What server and clients must share: the model's tensors' shapes and sums, and the vocabulary."""
    with torch.no_grad():
        parts = [(n, list(t.shape), round(float(t.double().sum()), 3)) for n, t in model.state_dict().items()]
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    return hashlib.sha256(json.dumps([parts, vocab]).encode()).hexdigest()[:16]


def load_student(model_dir: str, teacher_dir: str, config: FederatedConfig) -> tuple[Student, str, Any]:
    """The compressed model made trainable, its fingerprint (taken before) and its tokenizer."""
    loaded = load_model(model_dir, device="cpu")
    fp = fingerprint_model(loaded.model, loaded.tokenizer)
    teacher = load_model(teacher_dir, device="cpu").model
    ctx = Context(tokenizer=loaded.tokenizer, device=torch.device("cpu"), teacher=teacher)
    return Student(loaded.model, config.train, ctx, config.freeze_lora_a), fp, loaded.tokenizer


# ---- the server's side ----------------------------------------------------------------------------


def nbytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def weighted_mean(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """FedAvg: the parameters averaged with ``weights`` (tokens trained on)."""
    total = float(sum(weights))
    if total <= 0:
        raise TrainError("no client trained on any tokens this round")
    return {n: sum(w / total * s[n] for s, w in zip(states, weights, strict=True)) for n in states[0]}  # type: ignore[misc]


@dataclass
class Aggregator:
    """The server's update rule over rounds (FedAdam keeps its moments here)."""

    kind: str = "fedavg"
    lr: float = 1e-2
    step: float = 1.0  # FedAvg's server step
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)

    def __call__(self, global_state: dict[str, Tensor], mean: dict[str, Tensor]) -> dict[str, Tensor]:
        """The next global parameters from this round's (token-weighted) mean of the clients'."""
        if self.kind != "fedadam":
            if self.step == 1.0:
                return mean
            return {n: g + self.step * (mean[n] - g) for n, g in global_state.items()}
        b1, b2 = self.betas
        out = {}
        for n, g in global_state.items():
            delta = mean[n] - g
            self.m[n] = b1 * self.m.get(n, torch.zeros_like(g)) + (1 - b1) * delta
            self.v[n] = b2 * self.v.get(n, torch.zeros_like(g)) + (1 - b2) * delta**2
            out[n] = g + self.lr * self.m[n] / (self.v[n].sqrt() + self.tau)
        return out
