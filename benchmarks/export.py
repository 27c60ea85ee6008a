"""compressed-tensors and ONNX export, each measured in its own runtime.

    python -m benchmarks.export [--threads 2] [--windows 64] [--calib-windows 128] [--skip-tinyllama]
                                [--peer-dir DIR] [--export-data FILE] [--table-only]

Built-in model: the bf16 original and four lmpress recipes (GPTQ W4 g128 symmetric and
asymmetric, RTN W8 per channel, W8A8), each saved by lmpress and exported to compressed-tensors and
to ONNX. Every directory is run in its runtime: lmpress's eager forward (perplexity and KL against
the bf16 original), ``transformers.AutoModelForCausalLM`` with the compressed-tensors package, and
ONNX Runtime (perplexity, and KL against lmpress's float32 forward of the same model: what the
export cost). Bytes on disk, prefill and decode tokens/s of each (2 threads, one process).

TinyLlama-1.1B shapes (random weights generated to disk): export seconds and peak memory, bytes,
and prefill/decode tokens/s of the bf16 original and of RTN W4 g128 in lmpress, transformers and
ONNX Runtime (float32 graph against MatMulNBits).

With ``--peer-dir``, llm-compressor's own W4A16 GPTQ directory of the built-in model (written by
`benchmarks/export_peers.py` in the peer environment on the windows ``--export-data`` wrote) is
loaded in transformers beside lmpress's export of the same recipe: their ``quantization_config``
and tensor names and shapes are diffed, and their perplexities compared.

Writes ``benchmarks/results/export.json`` and the ``export`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import lmpress
from benchmarks.common import RESULTS, export_windows, machine, markdown_table, split_windows, timed, write_results
from lmpress.evaluation import quality, speed
from lmpress.export import export
from lmpress.export.onnx_runtime import OnnxModel
from lmpress.io import save, weight_bytes
from lmpress.method import Context
from lmpress.nn.quant_linear import QuantLinear
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe
from lmpress.speed import PeakRSS

RECIPES: dict[str, dict[str, Any] | None] = {
    "bf16 original": None,
    "W4 g128 sym (gptq)": {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True},
    "W4 g128 asym (gptq)": {"method": "gptq", "bits": 4, "group_size": 128},
    "W8 per-channel (rtn)": {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True},
    "W8A8 (smoothquant)": {"method": "w8a8"},
}
PEER_RECIPE = "W4 g128 sym (gptq)"  # llm-compressor's W4A16 preset
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}  # fmt: skip


def exact_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """lmpress's float32 forward through its dequantizing path: what the codes mean."""
    model = copy.deepcopy(model).float()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act_bits is None:
            m._kernel = ("dequant", None)
    return model


def transformers_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()  # type: ignore[no-any-return]


def runtime_row(recipe: str, runtime: str, model: torch.nn.Module, path: Path, windows: torch.Tensor,
                reference: torch.nn.Module, vocab: int, **extra: Any) -> dict[str, Any]:  # fmt: skip
    q = quality(model, windows, reference=reference)
    s = speed(model, vocab, repeats=2)
    row = {"recipe": recipe, "runtime": runtime, "bytes": weight_bytes(path), **q, **s, **extra}
    print(f"{recipe:22s} {runtime:34s} ppl {q['perplexity']:.3f} kl {q['kl']:.2e} bytes {row['bytes']:,} "
          f"decode {s['decode_tokens_per_s']:.0f} prefill {s['prefill_tokens_per_s']:.0f}", flush=True)  # fmt: skip
    return row


def builtin_rows(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    loaded = lmpress.load("builtin", device="cpu")
    original, tok = loaded.model, loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    windows = eval_data.windows
    vocab = int(original.get_input_embeddings().weight.shape[0])
    rows: list[dict[str, Any]] = []
    for name, stage in RECIPES.items():
        model = copy.deepcopy(original)
        if stage is not None:
            ctx = Context(tokenizer=tok, device=torch.device("cpu"), calibration=lambda: calib)
            run_stages(model, parse_recipe({"stages": [stage]}), ctx)
        src = save(model, tok, work / f"lmpress-{len(rows)}")
        rows.append(runtime_row(name, "lmpress eager", model, src, windows, original, vocab))
        exact = exact_fp32(model)
        ct = work / f"ct-{len(rows)}"
        report = export(lmpress.load(src, device="cpu"), "compressed-tensors", ct)
        rows.append(runtime_row(name, "transformers + compressed-tensors", transformers_model(ct), ct, windows, exact,
                                vocab, layout=report.type_counts()))  # fmt: skip
        onnx_dir = work / f"onnx-{len(rows)}"
        report = export(lmpress.load(src, device="cpu"), "onnx", onnx_dir)
        rows.append(runtime_row(name, "onnxruntime", OnnxModel(onnx_dir, args.threads), onnx_dir, windows, exact,
                                vocab, layout=report.type_counts()))  # fmt: skip
        if name == PEER_RECIPE:
            shutil.copytree(ct, work / "peer-compare-lmpress")
        gc.collect()
    info = {"eval": eval_data.manifest.to_dict(), "calib": calib.manifest.to_dict()}
    return rows, info


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the set values (a null and an absent key read the same to every loader; the
    package's versions differ in which of the two they write)."""
    if not isinstance(d, dict):
        return {} if d is None or d == {} else {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _tensors(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[k] = list(h.get_slice(k).get_shape())
    return out


def peer_compare(peer: Path, ours: Path, windows: torch.Tensor) -> dict[str, Any]:
    """llm-compressor's directory against lmpress's for the same recipe, both loaded in transformers."""
    theirs_cfg = _flatten(json.loads((peer / "config.json").read_text())["quantization_config"])
    ours_cfg = _flatten(json.loads((ours / "config.json").read_text())["quantization_config"])
    differing = {k: [ours_cfg.get(k), theirs_cfg.get(k)] for k in sorted(set(ours_cfg) | set(theirs_cfg))
                 if ours_cfg.get(k) != theirs_cfg.get(k)}  # fmt: skip
    t_ours, t_theirs = _tensors(ours), _tensors(peer)
    original = lmpress.load("builtin", device="cpu").model
    ppl = {}
    for who, path in (("lmpress", ours), ("llm-compressor", peer)):
        ppl[who] = quality(transformers_model(path), windows, reference=original)
    return {
        "config_differences": differing,
        "same_config_keys": set(ours_cfg) == set(theirs_cfg),
        "tensor_names_only_lmpress": sorted(set(t_ours) - set(t_theirs)),
        "tensor_names_only_llmcompressor": sorted(set(t_theirs) - set(t_ours)),
        "shape_differences": {
            k: [t_ours[k], t_theirs[k]] for k in t_ours if k in t_theirs and t_ours[k] != t_theirs[k]
        },
        "tensors": len(t_ours),
        "bytes": {"lmpress": weight_bytes(ours), "llm-compressor": weight_bytes(peer)},
        "quality": ppl,
    }


def tinyllama_rows(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Export cost, bytes and runtime speed at TinyLlama-1.1B shapes (random weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    src = work / "tinyllama"
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINYLLAMA, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(src)
    lmpress.load("builtin").tokenizer.save_pretrained(src)
    del model
    gc.collect()
    q4 = work / "tinyllama-w4"
    recipe = {"stages": [{"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}]}
    lmpress.compress(src, recipe, output=q4, run_eval=False)
    lengths = {"prompt_len": 128, "decode_tokens": 16, "batch": 2, "repeats": 1}
    rows: list[dict[str, Any]] = []
    for name, d in (("bf16", src), ("W4 g128 sym (rtn)", q4)):
        loaded = lmpress.load(d, device="cpu")
        rows.append({"model": name, "runtime": "lmpress eager", "bytes": weight_bytes(d),
                     **speed(loaded.model, 32000, **lengths)})  # fmt: skip
        for fmt in ("compressed-tensors", "onnx"):
            out = work / f"tinyllama-{name.split()[0]}-{fmt}"
            gc.collect()
            with PeakRSS() as mem:
                base = PeakRSS.rss()
                report, secs = timed(lambda loaded=loaded, out=out, fmt=fmt: export(loaded, fmt, out))
            gc.collect()
            runtime: torch.nn.Module = OnnxModel(out, args.threads) if fmt == "onnx" else transformers_model(out)
            label = "onnxruntime" if fmt == "onnx" else "transformers + compressed-tensors"
            row = {"model": name, "runtime": label, "bytes": weight_bytes(out), "export_seconds": secs,
                   "export_rss_over_loaded_mb": (mem.peak - base) / 2**20, "layout": report.type_counts(),
                   **speed(runtime, 32000, **lengths)}  # fmt: skip
            print(row, flush=True)
            rows.append(row)
            del runtime
            gc.collect()
            shutil.rmtree(out)
        del loaded
        gc.collect()
    return rows


def _layout(r: dict[str, Any]) -> str:
    return ", ".join(f"{n} {t}" for t, n in r.get("layout", {}).items()) or "-"


def table(payload: dict[str, Any]) -> str:
    info = payload["info"]
    lines = [
        "## compressed-tensors and ONNX export (issue 16)",
        "",
        f"Built-in model, `stdlib` eval split ({info['eval']['windows']} windows x 256 tokens, sha256 "
        f"{info['eval']['sha256'][:12]}); calibration {info['calib']['windows']} windows of the calib split; "
        f"{payload['machine']['threads']} threads, one process. Each lmpress result is run in lmpress and, "
        "exported, in its runtime. KL: lmpress eager against the bf16 original (what compression cost); "
        "transformers and ONNX Runtime against lmpress's float32 forward of the same model (what the export "
        "cost). Speed: prefill of 128 tokens at batch 1, decode of 64 with the KV cache. "
        "`python -m benchmarks.export`.",
        "",
    ]
    body = []
    for r in payload["builtin"]:
        body.append([r["recipe"], r["runtime"], f"{int(r['bytes']):,}", f"{r['perplexity']:.3f}", f"{r['kl']:.1e}",
                     f"{100 * r['top1_agreement']:.1f}%", f"{r['prefill_tokens_per_s']:,.0f}",
                     f"{r['decode_tokens_per_s']:,.0f}", _layout(r)])  # fmt: skip
    lines.append(markdown_table(["recipe", "runtime", "bytes", "perplexity", "KL", "top-1", "prefill tok/s",
                                 "decode tok/s", "layers as"], body))  # fmt: skip
    rows = {(r["recipe"], r["runtime"]): r for r in payload["builtin"]}
    fp32 = rows[("bf16 original", "onnxruntime")]["decode_tokens_per_s"]
    w4 = rows[("W4 g128 sym (gptq)", "onnxruntime")]["decode_tokens_per_s"]
    lines += [
        "",
        f"ONNX int4 (MatMulNBits) decode against the float32 ONNX export: {w4 / fp32:.2f}x (built-in; a model "
        "this small is bound by per-op overhead, not by weight bytes). transformers runs a compressed-tensors "
        "checkpoint on CPU by decompressing it to the model's dtype (there is no CPU int4 kernel on that path), "
        "so it has the bytes on disk but not the speed; vLLM's kernels are GPU-only. ONNX Runtime's 8-bit "
        "`MatMulNBits` at accuracy level 0 (float32 compute, exact) is slower than its 4-bit one.",
    ]
    if payload.get("tinyllama"):
        t = payload["tinyllama"]
        lines += ["", "TinyLlama-1.1B shapes (random weights): prefill 128 tokens at batch 1, decode 16, one run.", ""]
        t_rows = [[r["model"], r["runtime"], f"{r['bytes'] / 1e9:.2f} GB", f"{r['prefill_tokens_per_s']:.0f}",
                   f"{r['decode_tokens_per_s']:.2f}", f"{r['export_seconds']:.0f}" if "export_seconds" in r else "-",
                   f"{r['export_rss_over_loaded_mb']:.0f}" if "export_rss_over_loaded_mb" in r else "-"]
                  for r in t]  # fmt: skip
        lines.append(markdown_table(["model", "runtime", "bytes", "prefill tok/s", "decode tok/s", "export s",
                                     "export peak RSS over loaded (MiB)"], t_rows))  # fmt: skip
        by = {(r["model"], r["runtime"]): r for r in t}
        ratio = (
            by[("W4 g128 sym (rtn)", "onnxruntime")]["decode_tokens_per_s"]
            / by[("bf16", "onnxruntime")]["decode_tokens_per_s"]
        )
        lines += ["", f"ONNX int4 decode against the float32 ONNX export at TinyLlama shapes: {ratio:.2f}x."]
    peer = payload.get("llmcompressor")
    if peer:
        q = peer["quality"]
        lines += [
            "",
            "Against llm-compressor's own W4A16 GPTQ directory of the built-in model (same calibration windows), "
            "both loaded by transformers with compressed-tensors:",
            "",
            markdown_table(
                ["writer", "bytes", "perplexity", "KL vs bf16 original", "top-1"],
                [
                    [
                        w,
                        f"{peer['bytes'][w]:,}",
                        f"{q[w]['perplexity']:.3f}",
                        f"{q[w]['kl']:.4f}",
                        f"{100 * q[w]['top1_agreement']:.1f}%",
                    ]
                    for w in ("lmpress", "llm-compressor")
                ],
            ),
            "",
            "quantization_config entries that differ (lmpress / llm-compressor; null and absent read the same): "
            + (", ".join(f"`{k}`: {v[0]} / {v[1]}" for k, v in peer["config_differences"].items()) or "none")
            + f". Tensor names only in one: {len(peer['tensor_names_only_lmpress'])} / "
            f"{len(peer['tensor_names_only_llmcompressor'])}; shape differences: {len(peer['shape_differences'])} "
            f"(of {peer['tensors']} tensors). `actorder` and `observer` record how llm-compressor calibrated "
            "(vLLM reads `actorder` only to expect a `g_idx` tensor for `group` order; `static` and absent store "
            "none); `version` is the writing package's.",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--skip-tinyllama", action="store_true")
    ap.add_argument("--only-tinyllama", action="store_true", help="keep the other rows of results/export.json")
    ap.add_argument("--peer-dir", type=Path, default=None, help="llm-compressor's directory (export_peers.py)")
    ap.add_argument("--export-data", type=Path, default=None, help="write the windows for export_peers.py and stop")
    ap.add_argument("--table-only", action="store_true", help="re-render the table from results/export.json")
    args = ap.parse_args()
    if args.table_only:
        payload = json.loads((RESULTS / "export.json").read_text())
        write_results("export", payload, table(payload))
        return
    torch.set_num_threads(args.threads)
    if args.export_data:
        tok = lmpress.load("builtin").tokenizer
        export_windows(
            args.export_data, split_windows(tok, "eval", args.windows), split_windows(tok, "calib", args.calib_windows)
        )
        return
    work = Path(tempfile.mkdtemp(prefix="lmpress-export-bench-"))
    try:
        if args.only_tinyllama:
            payload: dict[str, Any] = json.loads((RESULTS / "export.json").read_text())
            payload["machine_tinyllama"] = machine()
        else:
            rows, info = builtin_rows(args, work)
            payload = {"machine": machine(), "info": info, "builtin": rows}
            if args.peer_dir:
                tok = lmpress.load("builtin").tokenizer
                windows = split_windows(tok, "eval", args.windows).windows
                payload["llmcompressor"] = peer_compare(args.peer_dir, work / "peer-compare-lmpress", windows)
        if not args.skip_tinyllama:
            payload["tinyllama"] = tinyllama_rows(args, work)
        write_results("export", payload, table(payload))
        print(table(payload))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
