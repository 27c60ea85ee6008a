"""Saved directories: atomic, self-describing, and exact on reload."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmpress.errors import ModelLoadError, OutputError
from lmpress.io import atomic_dir, save
from lmpress.io.load import load_model


def _logits(model: torch.nn.Module, n: int = 64) -> torch.Tensor:
    ids = torch.arange(n)[None] % 200
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_save_and_reload_exact(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("gpt2"))
    out = save(loaded.model, loaded.tokenizer, tmp_path / "out", {"recipe": {"name": "x"}})
    meta = json.loads((out / "lmpress.json").read_text())
    assert meta["format_version"] == 1 and meta["recipe"] == {"name": "x"}
    assert meta["modules"]["transformer.h.0.attn.c_attn"] == {"format": "dense", "dtype": "float32"}
    assert meta["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    assert {"torch", "transformers", "lmpress"} <= set(meta["versions"])
    again = load_model(out)
    assert again.meta["recipe"] == {"name": "x"}
    assert torch.equal(_logits(loaded.model), _logits(again.model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_non_empty_output_refused_unless_overwrite(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("llama"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not empty; choose another or pass --overwrite"):
        save(loaded.model, loaded.tokenizer, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save(loaded.model, loaded.tokenizer, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_interrupt_while_saving_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_overwrite_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True):
        raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old"


def test_newer_format_is_refused(tiny_model_dir: Callable[..., Path], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("llama"))
    out = save(loaded.model, loaded.tokenizer, tmp_path / "out")
    meta = json.loads((out / "lmpress.json").read_text())
    (out / "lmpress.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelLoadError, match="lmpress format 99"):
        load_model(out)


RELOAD_SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import lmpress
from lmpress.speed import PeakRSS
import transformers.models.llama.modeling_llama  # imports are the process's, not the model's
lmpress.load("builtin")  # so is the first tokenizer and model build
warm = lmpress.load(Path(sys.argv[2]), device="cpu")  # and the first packed layers: a small W4 model
with torch.no_grad():
    warm.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
del warm
import gc; gc.collect()
base = PeakRSS.rss()
with PeakRSS() as mem:
    m = lmpress.load(Path(sys.argv[1]), device="cpu")
    with torch.no_grad():
        out = m.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
print(json.dumps({"added": mem.peak - base, "tokens": out.shape[1]}))
"""


def test_a_compressed_directory_reloads_in_one_copy_of_its_bytes(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Reloading a W4 directory and generating holds its bytes once: nothing dense is allocated and
    thrown away, the file's tensors become the model's, and the int4 kernel layout replaces the stored
    codes. Measured in child processes at two depths, so the fixed cost of a run cancels: 12 more
    blocks add at most 1.2x their bytes on disk (before: 4.6x in all)."""
    import os
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    import lmpress

    script = tmp_path / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMPRESS_TRACK": "0"}
    added, nbytes = {}, {}
    warm = tmp_path / "warm"  # the one-time costs of a first packed load, paid before measuring
    lmpress.compress(
        "builtin", {"stages": [{"method": "rtn", "bits": 4, "group_size": 128}]}, run_eval=False, output=warm
    )
    for depth in (4, 16):
        config = AutoConfig.for_model(
            "llama", vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408, num_hidden_layers=depth,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        src, out = tmp_path / f"src{depth}", tmp_path / f"w4-{depth}"
        AutoModelForCausalLM.from_config(config).save_pretrained(src)
        tokenizer.save_pretrained(src)
        recipe = {"stages": [{"method": "rtn", "bits": 4, "group_size": 128}]}
        lmpress.compress(src, recipe, run_eval=False, output=out, stream=False)
        nbytes[depth] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        cmd = [sys.executable, str(script), str(out), str(warm)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        r = json.loads(run.stdout.strip().splitlines()[-1])
        assert r["tokens"] == 3 + 8
        added[depth] = r["added"]
    assert added[16] - added[4] <= 1.2 * (nbytes[16] - nbytes[4]), (added, nbytes)


def test_plain_transformers_refuses_a_packed_directory(tmp_path: Path) -> None:
    """A packed 4-bit directory must not "load" in plain transformers with random weights in place of
    its codes: its weight file is named for lmpress, so from_pretrained finds none; lmpress loads it,
    and a directory of dense layers keeps the name transformers reads."""
    from transformers import AutoModelForCausalLM

    import lmpress

    packed = lmpress.compress(
        "builtin", {"stages": [{"method": "rtn", "bits": 4}]}, run_eval=False, output=tmp_path / "w4"
    )
    dense = lmpress.compress("builtin", "bf16", run_eval=False, output=tmp_path / "bf16")
    assert sorted(p.name for p in (tmp_path / "w4").glob("*.safetensors")) == ["lmpress-packed.safetensors"]
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(
            lmpress.load(tmp_path / "w4").model(input_ids=ids).logits, packed.model(input_ids=ids).logits
        )
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
        assert torch.equal(plain(input_ids=ids).logits, dense.model(input_ids=ids).logits)
