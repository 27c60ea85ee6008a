"""Evaluation against held-out text: quality, size, speed and memory.

Perplexity windowing: the evaluation text is one token stream (documents joined by the
end-of-text token) cut into non-overlapping windows of ``seq_len`` tokens; every window is scored
independently from an empty context, and perplexity is exp of the mean negative log-likelihood over
all predicted positions (``seq_len - 1`` per window). Next-token accuracy, KL divergence and top-1
agreement are computed on the same positions; beside the mean KL, its median, 99th and 99.9th
percentiles and maximum over positions, as llama.cpp's ``perplexity --kl-divergence`` reports them
(linear interpolation between the sorted per-token values; llama.cpp scores only the second half of
each window, lmpress every position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmpress.arch import Adapter
from lmpress.calib import first_block_inputs, run_block
from lmpress.errors import EvaluationError
from lmpress.io import weight_bytes
from lmpress.progress import phase, track
from lmpress.speed import speed, speed_lengths
from lmpress.streaming import resident, stream_of


@dataclass
class QualityStats:
    """Running sums over predicted positions; `metrics` turns them into averages."""

    nll: float = 0.0
    correct: int = 0
    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    dropped_mass: float | None = None  # the reference's probability on tokens the model no longer has
    agree_full: int = 0  # the reference's top-1 over its whole vocabulary is the model's top-1
    # each position's KL (float32 on the CPU: 4 bytes a token, for the percentiles)
    kl_tokens: list[Tensor] = field(default_factory=list)

    def metrics(self, with_reference: bool) -> dict[str, float]:
        out = {
            "perplexity": math.exp(self.nll / self.tokens),
            "nll": self.nll / self.tokens,
            "accuracy": self.correct / self.tokens,
            "eval_tokens": float(self.tokens),
        }
        if with_reference:
            out["kl"] = self.kl / self.tokens
            out["top1_agreement"] = self.agree / self.tokens
            if self.kl_tokens:
                out.update(kl_percentiles(torch.cat(self.kl_tokens)))
        if self.dropped_mass is not None:
            out["dropped_token_mass"] = self.dropped_mass / self.tokens
            out["top1_agreement_full_vocab"] = self.agree_full / self.tokens
        return out

    def update(self, logits: Tensor, target: Tensor, ref_logits: Tensor | None = None) -> None:
        """Add predicted positions: ``logits`` (B, T, V) for ``target`` (B, T); the reference's
        ``ref_logits`` (B, T, V) on the same vocabulary, if any."""
        logp = F.log_softmax(logits, dim=-1)
        self.nll += -logp.gather(-1, target[..., None]).sum().item()
        pred = logits.argmax(-1)
        self.correct += int((pred == target).sum())
        self.tokens += target.numel()
        if ref_logits is not None:
            ref_logp = F.log_softmax(ref_logits, dim=-1)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (B, T)
            self.kl += kl.sum().item()
            self.kl_tokens.append(kl.reshape(-1).float().cpu())
            self.agree += int((ref_logits.argmax(-1) == pred).sum())


def kl_percentiles(kl: Tensor) -> dict[str, float]:
    """Median, 99th and 99.9th percentile and maximum of per-token KL ``kl`` (n,), each the linear
    interpolation between the two nearest sorted values, as llama.cpp's perplexity tool computes them."""
    v = kl.double().sort().values
    n = v.numel()

    def pct(fraction: float) -> float:
        p = fraction * (n - 1)
        i = int(p)
        return float((1 - (p - i)) * v[i] + (p - i) * v[min(i + 1, n - 1)])

    return {"kl_median": pct(0.5), "kl_p99": pct(0.99), "kl_p999": pct(0.999), "kl_max": float(v[-1])}


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()  # (B, T, V)


def first_nonfinite(model: nn.Module, ids: Tensor) -> str | None:
    """The first module (in the order they run) whose output holds a NaN or an infinity on ``ids``."""
    found: list[str] = []

    def hook(name: str) -> Any:
        def check(_m: nn.Module, _args: object, out: object) -> None:
            t = out[0] if isinstance(out, tuple) and out else out
            if not found and isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(name)

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_finite(logits: Tensor, model: nn.Module, ids: Tensor, first_window: int, which: str = "the model") -> None:
    """Stop on non-finite logits, naming the window and the layer where they first appear: a
    perplexity of NaN or infinity is not a measurement."""
    if bool(torch.isfinite(logits).all()):
        return

    bad = (~torch.isfinite(logits)).flatten(1).any(1).nonzero()[:, 0]
    window = first_window + int(bad[0])
    layer = first_nonfinite(model, ids[int(bad[0]) : int(bad[0]) + 1])
    where = f", first in {layer}" if layer else ""
    raise EvaluationError(
        f"{which} produced NaN or infinite logits on evaluation window {window}{where}; its weights or "
        "activations overflow: evaluate in float32 (--dtype float32) or fix the weights"
    )


@torch.no_grad()
def quality(
    model: nn.Module,
    windows: Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 8,
    progress: bool = False,
    token_map: Tensor | None = None,
) -> dict[str, float]:
    """Perplexity, accuracy and (with a reference model) KL(reference || model) and top-1 agreement.

    windows: (N, T) token ids. Both models see exactly the same tokens. With ``token_map`` (the
    reference's id -> the model's id, -1 for a token the model's pruned vocabulary dropped) the
    windows are in the reference's ids and must use kept tokens only; the reference's distribution
    is compared on the kept tokens (renormalized), and the mass it put on dropped ones is reported.
    """
    device = next(model.parameters()).device
    stats = QualityStats()
    kept = None
    if token_map is not None:
        if bool((token_map[windows] < 0).any()):
            raise ValueError("evaluation windows use tokens the pruned vocabulary dropped")
        kept = (token_map >= 0).nonzero()[:, 0]  # reference ids in the model's order (the map is increasing)
        stats.dropped_mass = 0.0
    for i in track(range(0, windows.shape[0], batch_size), "evaluating", enabled=progress):
        ref_ids = windows[i : i + batch_size]
        ids = (token_map[ref_ids] if token_map is not None else ref_ids).to(device)  # (B, T)
        logits = _logits(model, ids)[:, :-1]  # (B, T-1, V)
        check_finite(logits, model, ids, i)
        target = ids[:, 1:]  # (B, T-1)
        ref_logits = None
        if reference is not None:
            ref_device = next(reference.parameters()).device
            ref_logits = _logits(reference, ref_ids.to(ref_device))[:, :-1].to(device)
            check_finite(ref_logits, reference, ref_ids.to(ref_device), i, "the reference")
            if kept is not None and token_map is not None:
                full = F.log_softmax(ref_logits, dim=-1)
                stats.agree_full += int((token_map.to(device)[ref_logits.argmax(-1)] == logits.argmax(-1)).sum())
                ref_logits = ref_logits[..., kept.to(device)]
                stats.dropped_mass = (stats.dropped_mass or 0.0) + float(
                    (1 - full[..., kept.to(device)].exp().sum(-1)).clamp(min=0).sum()
                )
        stats.update(logits, target, ref_logits)
    return stats.metrics(reference is not None)


HEAD_POSITIONS = 64  # positions whose logits a streamed evaluation holds at once


def after_head(adapter: Adapter, logits: Tensor) -> Tensor:
    """The head's output as the model's own forward hands it on (Cohere's logit_scale applied)."""
    fn = adapter.spec.logits_after_head
    return logits if fn is None else fn(adapter.model.config, logits)


@torch.no_grad()
def streamed_quality(
    model: nn.Module,
    windows: Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 8,
    progress: bool = False,
    reference_hidden: list[Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, float] | None, list[Tensor] | None]:
    """`quality` of ``model`` and of its ``reference`` in one pass, block by block: both models'
    block i in memory at a time (streamed models, `lmpress.streaming`), the hidden states of both
    carried. ``reference_hidden``: the reference's last hidden states on these windows from an
    earlier pass (per batch, before the final norm); then only its final norm and head run.
    Returns (model's metrics with KL and top-1 agreement, the reference's own metrics, the
    reference's last hidden states)."""
    models = [model] if reference is None else [model, reference]
    adapters = [Adapter(m) for m in models]
    through = models if reference_hidden is None else [model]  # whose blocks run
    inputs = [first_block_inputs(m, windows, batch_size) for m in through]
    for i in track(range(adapters[0].num_blocks), "evaluating blocks", enabled=progress):
        for k, (m, a) in enumerate(zip(through, adapters, strict=False)):
            with resident(m, [a.block_name(i)]):
                inputs[k] = replace(inputs[k], hidden=run_block(a.blocks()[i], inputs[k].at(i)))
    hidden = [inp.hidden for inp in inputs]
    if reference is not None and reference_hidden is not None:
        hidden.append(reference_hidden)
    stats = [QualityStats() for _ in models]
    ends = [[a.final_norm()[0], a.head()[0]] for a in adapters]
    heads = [m.get_submodule(e[1]) for m, e in zip(models, ends, strict=True)]
    shared = reference is not None and same_head(model, reference)
    if shared:  # one copy of a big vocabulary's table serves both models
        heads[-1] = heads[0]
    predicted = windows.shape[1] - 1
    with (
        resident(model, ends[0]),
        resident(reference if reference is not None else model, ends[-1][: 1 if shared else 2]),
    ):
        for b in range(len(hidden[0])):
            for r in range(hidden[0][b].shape[0]):
                w = b * batch_size + r
                # a window's logits a few positions at a time: a 128k vocabulary's are big, and the
                # statistics are sums over positions, so the pieces add up to the same numbers
                for t0 in range(0, predicted, HEAD_POSITIONS):
                    t1 = min(t0 + HEAD_POSITIONS, predicted)
                    target = windows[w : w + 1, t0 + 1 : t1 + 1]  # (1, t)
                    logits = [
                        after_head(a, head(m.get_submodule(e[0])(h[b][r : r + 1, t0:t1]))).float()
                        for m, a, e, h, head in zip(models, adapters, ends, hidden, heads, strict=True)
                    ]  # [(1, t, V)]
                    target = target.to(logits[0].device)
                    for lg, which in zip(logits, ("the compressed model", "the original"), strict=False):
                        if not bool(torch.isfinite(lg).all()):
                            raise EvaluationError(
                                f"{which} produced NaN or infinite logits on evaluation window {w}; its weights "
                                "or activations overflow: fix the weights or exclude the layer"
                            )
                    ref = logits[1].to(logits[0].device) if reference is not None else None
                    stats[0].update(logits[0], target, ref)
                    if reference is not None:
                        stats[1].update(logits[1], target.to(logits[1].device))
    theirs = stats[1].metrics(False) if reference is not None else None
    return stats[0].metrics(reference is not None), theirs, hidden[1] if reference is not None else None


def same_head(model: nn.Module, reference: nn.Module) -> bool:
    """Whether the streamed ``model``'s head is the streamed ``reference``'s, tensor for tensor: read
    from the same checkpoint, unchanged by any stage (no spill of it, nor of the embeddings it
    may be tied to), of the same type and dtype."""
    mine, theirs = stream_of(model), stream_of(reference)
    if mine is None or theirs is None or mine.source.path != theirs.source.path:
        return False
    a, b = Adapter(model), Adapter(reference)
    (name, head), (_, ref_head) = a.head(), b.head()
    units = {name, *a.embeddings()}
    weight, ref_weight = getattr(head, "weight", None), getattr(ref_head, "weight", None)
    return (
        not units & set(mine.spills)
        and type(head) is type(ref_head)
        and isinstance(weight, Tensor)
        and isinstance(ref_weight, Tensor)
        and weight.dtype == ref_weight.dtype
        and weight.shape == ref_weight.shape
    )


def count_parameters(model: nn.Module, dense: bool = False) -> int:
    """Logical weights: compressed layers report what they represent, dense tensors their size.

    A sparse layer counts the weights it kept, or with ``dense`` the whole matrix it stands for
    (so that bits per weight compare with a dense layer's). Shared tensors (tied embeddings) count
    once.
    """
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        logical = (dense and getattr(m, "num_dense_params", None)) or getattr(m, "num_logical_params", None)
        if callable(logical):
            n += int(logical())
            seen.update(id(t) for t in m.parameters())
            seen.update(id(t) for t in m.buffers())
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in memory, plus the kernel layouts compressed layers
    prepared for their forward (`QuantLinear`'s int4 layout); storage shared by several tensors
    counts once."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        prepared = getattr(m, "_kernel", None)
        if prepared is not None and isinstance(prepared[1], tuple):
            tensors += [t for t in prepared[1] if isinstance(t, Tensor)]
    for t in tensors:
        if t.is_meta:  # not in memory (a QuantLinear's codes held only in its kernel layout)
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    runtime = getattr(model, "runtime_bytes", None)  # weights held by another runtime (llama.cpp)
    return total + (int(runtime()) if callable(runtime) else 0)


def size(model: nn.Module, saved_dir: Path | None = None) -> dict[str, float]:
    """Parameters, bytes (on disk when saved, else of the tensors in memory) and bits per weight."""
    in_memory = tensor_bytes(model)
    on_disk = weight_bytes(saved_dir) if saved_dir is not None else None
    nbytes = on_disk if on_disk else in_memory
    return {
        **bits_per_weight(count_parameters(model), count_parameters(model, dense=True), nbytes),
        "bytes": float(nbytes),
        "bytes_on_disk": float(on_disk) if on_disk else float("nan"),
        "weights_memory_mb": in_memory / 2**20,
    }


def bits_per_weight(params: int, dense_params: int, nbytes: int) -> dict[str, float]:
    """``bits_per_weight`` over every weight the matrices stand for (pruned ones included: the
    figure compares with a dense model's); a sparse model also gets ``bits_per_kept_weight``."""
    out = {"parameters": float(params), "bits_per_weight": 8 * nbytes / dense_params}
    if dense_params != params:
        out["bits_per_kept_weight"] = 8 * nbytes / params
    return out


def evaluate(
    model: nn.Module,
    windows: Tensor,
    *,
    reference: nn.Module | None = None,
    saved_dir: Path | None = None,
    batch_size: int = 8,
    measure_speed: bool = True,
    progress: bool = False,
    token_map: Tensor | None = None,
) -> dict[str, float]:
    """Every metric of one model: quality (vs ``reference`` if given), size, and speed."""
    was_training = model.training
    model.eval()
    metrics = quality(
        model, windows, reference=reference, batch_size=batch_size, progress=progress, token_map=token_map
    )
    metrics.update(size(model, saved_dir))
    if measure_speed:
        vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
        metrics.update(speed(model, vocab, **speed_lengths(model)))
    model.train(was_training)
    return metrics


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy continuations of ``prompts`` (the generated text only), to read beside the metrics."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with phase(f"generating {len(prompts)} samples"):
        out = _generate(model, tokenizer, prompts, max_new_tokens, device)
    model.train(was_training)
    return out


def _generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, device: Any) -> list[str]:
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        gen = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out
