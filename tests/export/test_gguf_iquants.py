"""GGUF export of llama.cpp's i-quant types, run by llama.cpp itself.

(`test_gguf.test_llama_cpp_runs_every_type` runs every grid on the built-in model; here a width
that 256-weight super-blocks do not tile: IQ4_XS, the IQ3s and the IQ2s fall back to IQ4_NL
there, as llama.cpp does.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmpress
from lmpress.export import export
from lmpress.io.load import LoadedModel
from lmpress.nn.gguf_linear import GGUFLinear
from tests.export.helpers import kl
from tests.export.test_gguf import KL_MAX, needs_llama

gguf = pytest.importorskip("gguf")


def _llama_logits(path: Path, ids: list[int]) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


@pytest.fixture(scope="module")
def wide_mlp_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:  # type: ignore[no-untyped-def]
    """A random Llama with 256-wide attention and a 576-wide MLP (the down projection's rows are
    2.25 super-blocks); weights large enough that its next-token distributions are far from flat."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=576,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.06,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    out = tmp_path_factory.mktemp("iq") / "wide-mlp"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@needs_llama
@pytest.mark.parametrize("grid", ["iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs"])
def test_i_quants_with_the_iq4_nl_fallback_in_llama_cpp(grid: str, wide_mlp_dir: Path, tmp_path: Path) -> None:
    dense = lmpress.load(wide_mlp_dir, device="cpu")
    stage = {"method": "rtn", "grid": grid, "embedding_grid": grid, "ignore": []}
    r = lmpress.compress(wide_mlp_dir, {"stages": [stage]}, lmpress.DataOptions(calib_windows=2), run_eval=False)
    model = r.model.float()
    out = tmp_path / f"{grid}.gguf"
    report = export(LoadedModel(model, dense.tokenizer, str(wide_mlp_dir), Path(".")), "gguf", out)
    counts = report.type_counts()
    assert counts.get("iq4_nl") == 2 and counts.get(grid, 0) >= 13, counts  # down_proj x2 fell back

    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, GGUFLinear) and down.gtype.name == "iq4_nl"
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.IQ4_NL
    decoded = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(256, 576)
    assert np.array_equal(decoded, down.dequantize_weight().numpy())

    ids = torch.randint(0, len(dense.tokenizer), (128,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float()
        before = dense.model.float()(torch.tensor([ids])).logits[0].float()
    theirs = _llama_logits(out, ids)
    # llama.cpp computes with the stored weights: its KL from lmpress's compressed forward is far
    # below the quantization's own KL from the dense model
    assert kl(ours, theirs) < KL_MAX, kl(ours, theirs)
    # measured (quantization KL, llama.cpp's KL): iq4_xs 0.060, 3.6e-4; iq3_s 0.16, 3.8e-4; iq3_xxs 0.26, 3.4e-4;
    # iq2_s 0.39, 3.6e-4; iq2_xs 0.48, 3.3e-4; iq2_xxs 0.51, 3.5e-4
    assert kl(before, ours) > 20 * kl(ours, theirs), (kl(before, ours), kl(ours, theirs))
