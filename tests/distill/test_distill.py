"""Distillation: the loss math, recovery of compressed models in their formats, QAT, students, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.data_options import DataOptions
from lmpress.distill.distill import hidden_loss, kd_kl, layer_pairs
from lmpress.errors import LmpressError
from lmpress.io.load import load_model
from lmpress.nn import LoRALinear, QuantLinear, SparseLinear
from lmpress.pipeline import compress

TRAIN = {"steps": 30, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "eval_windows": 4, "precision": "fp32"}


def test_kd_kl_is_the_tempered_kl_times_t_squared() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert float(kd_kl(t, t)) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(t / 2, -1)
    manual = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert float(kd_kl(s, t, temperature=2.0)) == pytest.approx(float(manual), rel=1e-5)


def test_hidden_loss_and_layer_pairs() -> None:
    h = torch.randn(2, 3, 8)
    assert float(hidden_loss(h, h)) == 0.0
    assert float(hidden_loss(torch.zeros_like(h), h)) == pytest.approx(1.0)
    assert layer_pairs(2, 4) == [(1, 2), (2, 4)]  # the student's last layer meets the teacher's last
    assert layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]


def _data(text: Path) -> DataOptions:
    return DataOptions(source=text, seq_len=32, eval_windows=64, calib_windows=16)


def _kl(result: object) -> float:
    return float(result.metrics["compressed"]["kl"])  # type: ignore[attr-defined]


def test_recovery_after_quantization_keeps_the_codes_and_lowers_kl(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    src = trained_dir("llama")
    quant = {"method": "rtn", "bits": 2, "group_size": 32}
    before = compress(src, {"stages": [quant]}, _data(distill_text), measure_speed=False)
    out = tmp_path / "out"
    after = compress(
        src, {"stages": [quant, {"method": "distill", **TRAIN}]}, _data(distill_text), output=out, measure_speed=False
    )
    assert _kl(after) < 0.7 * _kl(before)
    q_before = before.model.model.layers[0].mlp.down_proj
    q_after = after.model.model.layers[0].mlp.down_proj
    assert isinstance(q_after, QuantLinear)
    assert torch.equal(q_after.qweight, q_before.qweight)  # the codes are untouched
    assert not torch.equal(q_after.scales, q_before.scales)  # the scales learned
    report = json.loads((out / "lmpress.json").read_text())["stages"][1]
    assert report["training"]["steps"] == 30 and report["history"][-1]["step"] == 30
    assert not (tmp_path / "out.work" / "distill" / "checkpoint").exists()  # finished: checkpoint removed
    assert list((tmp_path / "out.work" / "distill" / "tensorboard").iterdir())
    reloaded = load_model(out).model
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, after.model(input_ids=ids).logits)


def test_recovery_after_pruning_keeps_the_mask(trained_dir: Callable[[str], Path], distill_text: Path) -> None:
    src = trained_dir("gpt2")
    prune = {"method": "magnitude", "sparsity": 0.7}
    before = compress(src, {"stages": [prune]}, _data(distill_text), measure_speed=False)
    after = compress(src, {"stages": [prune, {"method": "distill", **TRAIN}]}, _data(distill_text), measure_speed=False)
    assert _kl(after) < 0.75 * _kl(before)
    layers = {n: m for n, m in after.model.named_modules() if isinstance(m, SparseLinear)}
    ref = {n: m for n, m in before.model.named_modules() if isinstance(m, SparseLinear)}
    assert layers and layers.keys() == ref.keys()
    for n, m in layers.items():
        assert torch.equal(m.mask, ref[n].mask) and m.nnz == ref[n].nnz


def test_qat_beats_round_to_nearest_at_the_same_bits(trained_dir: Callable[[str], Path], distill_text: Path) -> None:
    src = trained_dir("llama")
    grid = {"bits": 2, "group_size": 32}
    rtn = compress(
        src, {"stages": [{"method": "rtn", "mse_clip": True, **grid}]}, _data(distill_text), measure_speed=False
    )
    qat = compress(src, {"stages": [{"method": "qat", **grid, **TRAIN}]}, _data(distill_text), measure_speed=False)
    assert _kl(qat) < 0.7 * _kl(rtn)
    assert isinstance(qat.model.model.layers[1].self_attn.q_proj, QuantLinear)
    assert qat.metrics["compressed"]["bytes"] == rtn.metrics["compressed"]["bytes"]  # same format, same size


def test_half_size_student_distills_and_loads_with_plain_transformers(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    src = trained_dir("llama")
    shrink = {"method": "structured", "target": 0.5, "multiple_of": 8}
    pruned = compress(src, {"stages": [shrink]}, _data(distill_text), measure_speed=False)
    out = tmp_path / "student"
    student = compress(
        src,
        {"stages": [shrink, {"method": "distill", "hidden_weight": 1.0, "ce_weight": 0.5, **TRAIN}]},
        _data(distill_text),
        output=out,
        measure_speed=False,
    )
    assert _kl(student) < 0.7 * _kl(pruned)
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(plain(input_ids=ids).logits, student.model(input_ids=ids).logits)
    assert student.metrics["compressed"]["parameters"] < 0.8 * student.metrics["original"]["parameters"]


def test_lora_recovery_keeps_quantized_codes_beside_the_update(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path
) -> None:
    src = trained_dir("llama")
    quant = {"method": "rtn", "bits": 3, "group_size": 32}
    before = compress(src, {"stages": [quant]}, _data(distill_text), measure_speed=False)
    lora = {"method": "distill", "lora_rank": 4, **TRAIN}
    out = tmp_path / "lora"
    after = compress(src, {"stages": [quant, lora]}, _data(distill_text), output=out, measure_speed=False)
    layer = after.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear)
    assert torch.equal(layer.base.qweight, before.model.model.layers[0].self_attn.o_proj.qweight)
    assert float(layer.lora_b.abs().max()) > 0  # the update learned something
    assert _kl(after) < _kl(before)
    added = after.metrics["compressed"]["parameters"] - before.metrics["compressed"]["parameters"]
    # rank 4 x (in + out) of q, k, v, o, gate, up, down in 2 blocks (hidden 64, kv 32, mlp 128)
    assert added == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    reloaded = load_model(out).model
    ids = torch.randint(0, 100, (1, 16))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, after.model(input_ids=ids).logits)

    merged = {**lora, "lora_merge": "requantize"}
    requant = compress(src, {"stages": [quant, merged]}, _data(distill_text), measure_speed=False)
    layer = requant.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, QuantLinear)
    assert requant.metrics["compressed"]["bytes"] == before.metrics["compressed"]["bytes"]


def test_bad_distillation_input(trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path) -> None:
    from lmpress.models.reference import train_tokenizer
    from lmpress.sources import load_documents

    src = trained_dir("llama")
    with pytest.raises(LmpressError, match="steps"):
        compress(src, {"stages": [{"method": "distill", "steps": 0}]}, _data(distill_text), run_eval=False)
    with pytest.raises(LmpressError, match="fewer than one batch of 4096"):
        compress(src, {"stages": [{"method": "distill", "batch_size": 4096}]}, _data(distill_text), run_eval=False)
    other = tmp_path / "other-tokenizer"
    shutil.copytree(src, other)
    docs = [d for d in load_documents("stdlib") if d.path == "abc.py"]
    train_tokenizer(docs, 300).save_pretrained(other)
    with pytest.raises(LmpressError, match="does not use the student's tokenizer"):
        compress(src, {"stages": [{"method": "distill", "teacher": str(other)}]}, _data(distill_text), run_eval=False)


def test_an_interrupted_compress_resumes_when_run_again(
    trained_dir: Callable[[str], Path], distill_text: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmpress.distill.distill import Distiller

    src = trained_dir("llama")
    recipe = {
        "stages": [
            {"method": "rtn", "bits": 3, "group_size": 32},
            {"method": "distill", **TRAIN, "checkpoint_every": 5},
        ]
    }
    straight = compress(src, recipe, _data(distill_text), output=tmp_path / "a", measure_speed=False)

    real, calls = Distiller.loss, 0

    def dies_in_step_13(self: Distiller, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        nonlocal calls
        calls += 1
        if calls == 13:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(Distiller, "loss", dies_in_step_13)
    with pytest.raises(KeyboardInterrupt):
        compress(src, recipe, _data(distill_text), output=tmp_path / "b", measure_speed=False)
    assert not (tmp_path / "b").exists()  # nothing that looks finished
    assert (tmp_path / "b.work" / "distill" / "checkpoint").exists()
    monkeypatch.setattr(Distiller, "loss", real)
    resumed = compress(src, recipe, _data(distill_text), output=tmp_path / "b", measure_speed=False)
    assert resumed.stages[1]["training"]["resumed_from"] == 10
    assert resumed.metrics["compressed"]["kl"] == pytest.approx(straight.metrics["compressed"]["kl"], rel=1e-6)

    other = {"stages": [recipe["stages"][0], {**recipe["stages"][1], "lr": 5e-4}]}
    monkeypatch.setattr(Distiller, "loss", dies_in_step_13)
    calls = 0
    with pytest.raises(KeyboardInterrupt):
        compress(src, recipe, _data(distill_text), output=tmp_path / "c", measure_speed=False)
    monkeypatch.setattr(Distiller, "loss", real)
    with pytest.raises(LmpressError, match="belongs to another run"):
        compress(src, other, _data(distill_text), output=tmp_path / "c", measure_speed=False)


def test_a_teacher_held_in_8_bits_teaches_as_well(trained_dir: Callable[[str], Path], distill_text: Path) -> None:
    src = trained_dir("llama")
    quant = {"method": "rtn", "bits": 2, "group_size": 32}
    full = compress(src, {"stages": [quant, {"method": "distill", **TRAIN}]}, _data(distill_text), measure_speed=False)
    held = {"method": "distill", **TRAIN, "teacher_bits": 8}
    small = compress(src, {"stages": [quant, held]}, _data(distill_text), measure_speed=False)
    assert _kl(small) == pytest.approx(_kl(full), rel=0.1)


def test_gradual_pruning_with_recovery_between_steps(trained_dir: Callable[[str], Path], distill_text: Path) -> None:
    src = trained_dir("llama")
    one_shot = compress(
        src, {"stages": [{"method": "magnitude", "sparsity": 0.6}]}, _data(distill_text), measure_speed=False
    )
    steps = [
        {"method": "magnitude", "sparsity": 0.3},
        {"method": "distill", **TRAIN},
        {"method": "magnitude", "sparsity": 0.6},
        {"method": "distill", **TRAIN},
    ]
    gradual = compress(src, {"stages": steps}, _data(distill_text), measure_speed=False)
    layers = [m for m in gradual.model.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.density == pytest.approx(0.4, abs=0.01) for m in layers)
    assert _kl(gradual) < 0.7 * _kl(one_shot)
