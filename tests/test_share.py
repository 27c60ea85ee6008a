"""Cross-layer weight sharing: the merge math, stored once, reloads shared, composes with
quantization and recovery training, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmpress.data_options import DataOptions
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.method import Context
from lmpress.nn import QuantLinear
from lmpress.pipeline import compress
from lmpress.share import Member, ShareConfig, apply, group_cost, merged_weight


def test_activation_merge_is_the_least_squares_weight_and_beats_the_mean() -> None:
    torch.manual_seed(0)
    members = []
    for i in range(3):
        X = torch.randn(300, 12, dtype=torch.float64) * (1 + 3 * torch.rand(12, dtype=torch.float64))
        members.append(Member(i, {"p": f"b{i}.p"}, {"p": torch.randn(5, 12, dtype=torch.float64)}, {"p": X.T @ X}))
    W = merged_weight(members, "p", "activation", damp=1e-12).requires_grad_(True)
    loss = sum(torch.einsum("ri,ij,rj->", m.weights["p"] - W, m.hessians["p"], m.weights["p"] - W) for m in members)
    assert isinstance(loss, torch.Tensor)
    (grad,) = torch.autograd.grad(loss, W)
    assert grad.abs().max() < 1e-6 * float(loss.detach())
    assert group_cost(members, "activation", 1e-12) < group_cost(members, "mean", 1e-12)
    assert group_cost(members[:1], "activation", 1e-12) == 0.0


def _up(model: nn.Module, i: int) -> nn.Module:
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return blocks[i].mlp.c_fc if hasattr(blocks[i].mlp, "c_fc") else blocks[i].mlp.up_proj


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_parts_are_stored_once_and_reload_shared(
    arch: str, trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=32, calib_windows=32)
    out = tmp_path / "shared"
    recipe = {"stages": [{"method": "share", "groups": [{"part": "mlp", "blocks": [0, 1]}]}]}
    result = compress(trained_dir(arch), recipe, data, output=out, measure_speed=False)
    assert _up(result.model, 0) is _up(result.model, 1)
    mlp_params = sum(p.numel() for p in _up(result.model, 0).parameters())
    saved = result.metrics["original"]["parameters"] - result.metrics["compressed"]["parameters"]
    assert saved >= mlp_params  # the whole MLP (up, down and gate where present) of one block is gone
    assert result.stages[0]["parameters_saved"] == saved
    keys = load_file(out / "model.safetensors")
    assert not any(".1.mlp." in k for k in keys)  # block 1's MLP tensors are not in the file
    assert result.metrics["compressed"]["bytes"] < result.metrics["original"]["bytes"] - 2 * mlp_params * 3
    reloaded = load_model(out).model
    assert _up(reloaded, 0) is _up(reloaded, 1)
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_automatic_groups_meet_the_target_then_quantize_and_train_shared(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    data = DataOptions(source=distill_text, seq_len=32, eval_windows=64, calib_windows=32)
    src = trained_dir("llama")
    share = {"method": "share", "target": 0.2}
    alone = compress(src, {"stages": [share]}, data, measure_speed=False)
    assert alone.stages[0]["saved_share"] >= 0.2 and alone.stages[0]["groups"]
    mean = compress(src, {"stages": [{**share, "merge": "mean"}]}, data, measure_speed=False)
    assert alone.metrics["compressed"]["kl"] < mean.metrics["compressed"]["kl"]
    train = {"method": "distill", "steps": 30, "batch_size": 8, "lr": 3e-4, "eval_every": 10, "precision": "fp32"}
    out = tmp_path / "shared-q"
    recovered = compress(src, {"stages": [share, train, {"method": "rtn", "bits": 8}]}, data, output=out)
    assert recovered.metrics["compressed"]["kl"] < 0.8 * alone.metrics["compressed"]["kl"]
    group = recovered.stages[0]["groups"][0]
    names = [
        f"model.layers.{b}.{'mlp.up_proj' if group['part'] == 'mlp' else 'self_attn.q_proj'}" for b in group["blocks"]
    ]
    layers = [recovered.model.get_submodule(n) for n in names]
    assert isinstance(layers[0], QuantLinear) and all(m is layers[0] for m in layers)  # still one module
    reloaded = load_model(out).model
    assert all(reloaded.get_submodule(n) is reloaded.get_submodule(names[0]) for n in names)
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, recovered.model(input_ids=ids).logits)


def test_bad_groups_are_refused_before_any_change(tiny_model_dir: Callable[..., Path], tokenizer: object) -> None:
    model = load_model(tiny_model_dir("llama")).model
    mlp = model.model.layers[1].mlp
    mlp.up_proj, mlp.gate_proj, mlp.down_proj = nn.Linear(64, 96), nn.Linear(64, 96), nn.Linear(96, 64)
    ctx = Context(tokenizer=tokenizer, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({"groups": [{"part": "mlp", "blocks": [0, 1]}]}, "different shapes"),
        ({"groups": [{"part": "attention", "blocks": [0, 5]}]}, "block 5 does not exist"),
        ({"groups": [{"part": "attention", "blocks": [0, 1]}, {"part": "attention", "blocks": [1, 0]}]}, "two groups"),
        ({"target": 0.9, "merge": "mean"}, "lower target"),
    ]
    for cfg, message in cases:
        with pytest.raises(LmpressError, match=message):
            apply(model, ShareConfig(**cfg), ctx)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
