"""GGUF export measured in llama.cpp: lmpress's GPTQ on GGUF grids against llama.cpp's own quantizer.

    python -m benchmarks.gguf [--threads 2] [--windows 200] [--calib-windows 128] [--llama-bin DIR]
                              [--draws 96,128,160] [--skip-tinyllama] [--table-only]

Built-in model: the bf16 original exported to GGUF, then for Q8_0, Q4_0, Q4_K_M, Q3_K_M and Q2_K
both llama.cpp's own quantizer (``llama_model_quantize``; with an importance matrix from
``llama-imatrix`` on the same calibration text when those tools are built, ``--llama-bin``) and
lmpress (the ``gguf-*`` presets: GPTQ on exactly the grids of llama.cpp's per-layer mix, token
embeddings and head included, exported bit-exactly). Every file's perplexity, KL and top-1
agreement against the bf16 original are measured *by llama.cpp* on the same held-out windows.

TinyLlama-1.1B shapes (random weights generated to disk): export time and peak memory (bf16 and
a Q4_K_M mix), and prefill/decode tokens/s of the Q4_K_M file in llama.cpp against lmpress's eager
forward of the same model and against the bf16 original in both.

Writes ``benchmarks/results/gguf.json`` and the ``gguf`` table of ``benchmarks/README.md``.
Build llama.cpp's tools from the sources llama-cpp-python vendors (its sdist) with
``cmake -B build && cmake --build build --target llama-imatrix llama-quantize``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lmpress
from benchmarks.common import RESULTS, machine, markdown_table, split_windows, write_results
from lmpress.evaluation import quality, speed
from lmpress.export import export
from lmpress.export.llama_runtime import LlamaCppModel
from lmpress.speed import PeakRSS

TYPES = ["q8_0", "q4_0", "q4_k_m", "q3_k_m", "q2_k"]
FTYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K"}
# lmpress's file for each llama.cpp file type: the same per-layer mix and embedding type, GPTQ-calibrated
LMPRESS = {
    "q8_0": "gguf-q8_0",
    "q4_0": {"method": "gptq", "mix": "q4_0", "embedding_grid": "q4_0", "ignore": []},
    "q4_k_m": "gguf-q4_k_m",
    "q3_k_m": "gguf-q3_k_m",
    "q2_k": {"method": "gptq", "mix": "q2_k", "embedding_grid": "q2_k", "ignore": []},
}
RTN_ABLATION = ("q4_k_m", "q3_k_m")  # the same grids by lmpress's round-to-nearest fit, no GPTQ
TINYLLAMA = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}  # fmt: skip


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int, bin_dir: Path | None, imatrix: Path | None) -> None:
    """llama.cpp's own quantizer: the library call, or its llama-quantize tool for an imatrix."""
    if imatrix is not None:
        assert bin_dir is not None
        cmd = [
            str(bin_dir / "llama-quantize"),
            "--imatrix",
            str(imatrix),
            str(src),
            str(dst),
            FTYPE[ftype],
            str(threads),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{FTYPE[ftype]}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}: {rc}")


def build_imatrix(src: Path, calib_text: Path, out: Path, bin_dir: Path, threads: int, chunks: int) -> bool:
    tool = bin_dir / "llama-imatrix"
    if not tool.is_file():
        return False
    cmd = [str(tool), "-m", str(src), "-f", str(calib_text), "-o", str(out), "-c", "256",
           "--chunks", str(chunks), "-t", str(threads), "--no-ppl"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out.is_file()


def measure(path: Path, reference: LlamaCppModel, windows: torch.Tensor, threads: int) -> dict[str, float]:
    """Quality of a GGUF file against the bf16 original, both run by llama.cpp."""
    m = LlamaCppModel(path, n_threads=threads, n_ctx=512)
    q = quality(m, windows, reference=reference)
    del m
    gc.collect()
    return {**q, "bytes": float(path.stat().st_size)}


def builtin_rows(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    loaded = lmpress.load("builtin", device="cpu")
    tok = loaded.tokenizer
    eval_data = split_windows(tok, "eval", args.windows)
    calib = split_windows(tok, "calib", args.calib_windows)
    bf16 = work / "bf16.gguf"
    export(loaded, "gguf", bf16)
    reference = LlamaCppModel(bf16, n_threads=args.threads, n_ctx=512)
    rows: list[dict[str, Any]] = [
        {"type": "bf16", "source": "original", **measure(bf16, reference, eval_data.windows, args.threads)}
    ]
    calib_text = work / "calib.txt"  # exactly the windows lmpress calibrates on, as text
    calib_text.write_text("".join(tok.decode(w) for w in calib.windows.tolist()))
    bin_dir = Path(args.llama_bin) if args.llama_bin else None
    imatrix = work / "imatrix.gguf"
    has_imatrix = bin_dir is not None and build_imatrix(
        bf16, calib_text, imatrix, bin_dir, args.threads, args.calib_windows
    )
    for t in TYPES:
        out = work / f"llama-{t}.gguf"
        _, secs = _timed(lambda t=t, out=out: llama_quantize(bf16, out, t, args.threads, bin_dir, None))
        rows.append(
            {
                "type": t,
                "source": "llama.cpp",
                "seconds": secs,
                **measure(out, reference, eval_data.windows, args.threads),
            }
        )
        if has_imatrix and t != "q8_0":
            out = work / f"llama-imatrix-{t}.gguf"
            _, secs = _timed(lambda t=t, out=out: llama_quantize(bf16, out, t, args.threads, bin_dir, imatrix))
            rows.append({"type": t, "source": "llama.cpp + imatrix", "seconds": secs,
                         **measure(out, reference, eval_data.windows, args.threads)})  # fmt: skip
        variants = [("lmpress gptq", LMPRESS[t])]
        if t in RTN_ABLATION:
            variants.append(
                ("lmpress rtn", {"method": "rtn", "mix": t, "embedding_grid": t.split("_")[0] + "_k", "ignore": []})
            )
        for source, recipe in variants:
            draws = []
            for n in args.draws:  # calibration sets of several sizes: the spread is part of the result
                d = work / f"{source.replace(' ', '-')}-{t}-{n}"
                draw_data = lmpress.DataOptions(calib_windows=n)
                r, secs = _timed(
                    lambda recipe=recipe, d=d, dd=draw_data: lmpress.compress(
                        "builtin", _recipe(recipe), dd, output=d, run_eval=False
                    )
                )
                out = work / f"{source.replace(' ', '-')}-{t}-{n}.gguf"
                report = export(d, "gguf", out)
                draws.append({"calib_windows": n, "seconds": secs, "tensor_types": report.type_counts(),
                              **measure(out, reference, eval_data.windows, args.threads)})  # fmt: skip
                del r
            rows.append({"type": t, "source": source, **_mean_of(draws), "draws": draws})
    del reference
    info = {"eval": eval_data.manifest.to_dict(), "calib": calib.manifest.to_dict(), "imatrix": has_imatrix,
            "draws": args.draws}  # fmt: skip
    return rows, info


def _mean_of(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """One lmpress row from its calibration draws: the mean of each metric, the perplexity's spread."""
    keys = ("perplexity", "kl", "top1_agreement", "bytes", "seconds")
    out: dict[str, Any] = {k: sum(d[k] for d in draws) / len(draws) for k in keys if k in draws[0]}
    ppl = torch.tensor([d["perplexity"] for d in draws], dtype=torch.float64)
    out["perplexity_sd"] = float(ppl.std()) if len(draws) > 1 else 0.0
    out["tensor_types"] = draws[0]["tensor_types"]
    return out


def _recipe(r: str | dict[str, Any]) -> Any:
    return r if isinstance(r, str) else {"stages": [r]}


def _timed(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def tinyllama_rows(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Export time and memory, and speed in llama.cpp against lmpress eager, at TinyLlama-1.1B shapes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    src = work / "tinyllama"
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINYLLAMA, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(src)
    lmpress.load("builtin").tokenizer.save_pretrained(src)  # 4096 tokens; the rest of the 32000 rows are padding
    del model
    gc.collect()
    q4 = work / "tinyllama-q4_k_m"
    recipe = {"stages": [{"method": "rtn", "mix": "q4_k_m", "embedding_grid": "q4_k", "ignore": []}]}
    _, compress_s = _timed(lambda: lmpress.compress(src, recipe, output=q4, run_eval=False))
    rows: list[dict[str, Any]] = []
    for name, d in (("bf16", src), ("q4_k_m (rtn)", q4)):
        loaded = lmpress.load(d, device="cpu")
        tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
        largest = max(t.numel() * t.element_size() for t in tensors)
        for t in tensors:  # page the memory-mapped weights in, so the baseline is the loaded model
            t.contiguous().view(torch.uint8).sum()
        gc.collect()
        out = work / f"tinyllama-{name.split()[0]}.gguf"
        with PeakRSS() as mem:
            base = PeakRSS.rss()
            _, secs = _timed(lambda loaded=loaded, out=out: export(loaded, "gguf", out))
        eager = speed(loaded.model, 32000, repeats=1)
        del loaded
        gc.collect()
        runtime = LlamaCppModel(out, n_threads=args.threads, n_ctx=512)
        in_llama = speed(runtime, 32000, repeats=1)
        del runtime
        gc.collect()
        rows.append({"model": name, "bytes": out.stat().st_size, "export_seconds": secs, "rss_before_mb": base / 2**20,
                     "rss_peak_mb": mem.peak / 2**20, "largest_tensor_mb": largest / 2**20,
                     "llama_cpp": in_llama, "lmpress_eager": eager,
                     "compress_seconds": compress_s if name != "bf16" else None})  # fmt: skip
    return rows


def table(payload: dict[str, Any]) -> str:
    rows = payload["builtin"]
    orig = rows[0]["perplexity"]
    by = {(r["type"], r["source"]): r for r in rows}
    lines = [
        "## GGUF export (issue 15)",
        "",
        "Built-in model, `stdlib` eval split "
        f"({payload['info']['eval']['windows']} windows x 256 tokens, "
        f"sha256 {payload['info']['eval']['sha256'][:12]}); "
        "every file run by **llama.cpp** (llama-cpp-python), KL and top-1 against the bf16 original in llama.cpp. "
        f"Calibration: {payload['info']['calib']['windows']} windows of the calib split (imatrix: the same text"
        f"{'' if payload['info']['imatrix'] else ', not built'}). lmpress rows: the mean over "
        f"{len(payload['info'].get('draws', [1]))} calibration sets of {payload['info'].get('draws', ['?'])} windows, "
        "± the standard deviation of the perplexity change (llama.cpp's quantizer has no calibration to vary). "
        "`python -m benchmarks.gguf`.",
        "",
    ]
    body = []
    for r in rows:
        best_llama = min(
            (by[(r["type"], s)] for s in ("llama.cpp", "llama.cpp + imatrix") if (r["type"], s) in by),
            key=lambda x: x["perplexity"],
            default=None,
        )
        ratio = size = kl_ratio = "-"
        if r["source"].startswith("lmpress") and best_llama is not None:
            d_ours, d_theirs = r["perplexity"] - orig, best_llama["perplexity"] - orig
            ratio = f"{d_ours / d_theirs:.2f}x" if d_theirs > 0 else "-"
            size = f"{100 * (r['bytes'] / best_llama['bytes'] - 1):+.1f}%"
            best_kl = min(
                by[(r["type"], s)]["kl"] for s in ("llama.cpp", "llama.cpp + imatrix") if (r["type"], s) in by
            )
            kl_ratio = f"{r['kl'] / best_kl:.2f}x"
        change = f"{100 * (r['perplexity'] / orig - 1):+.2f}%"
        if r.get("draws"):
            change += f" ± {100 * r['perplexity_sd'] / orig:.2f}"
        body.append([r["type"], r["source"], f"{int(r['bytes']):,}", size, f"{r['perplexity']:.3f}",
                     change, ratio, f"{r.get('kl', 0):.4f}", kl_ratio,
                     f"{100 * r.get('top1_agreement', 1):.1f}%"])  # fmt: skip
    header = ["type", "quantizer", "bytes", "size vs llama.cpp", "perplexity", "vs original",
              "increase vs best llama.cpp", "KL", "KL vs best llama.cpp", "top-1"]  # fmt: skip
    lines.append(markdown_table(header, body))
    if payload.get("tinyllama"):
        lines += ["", "TinyLlama-1.1B shapes (random weights), 2 threads, one run: prefill 128 tokens, decode 64.", ""]
        t_rows = []
        for r in payload["tinyllama"]:
            lc, eg = r["llama_cpp"], r["lmpress_eager"]
            t_rows.append([r["model"], f"{r['bytes'] / 1e9:.2f} GB", f"{lc['decode_tokens_per_s']:.1f}",
                           f"{eg['decode_tokens_per_s']:.1f}", f"{lc['prefill_tokens_per_s']:.0f}",
                           f"{eg['prefill_tokens_per_s']:.0f}", f"{r['export_seconds']:.1f}",
                           f"{r['rss_peak_mb'] - r['rss_before_mb']:.0f} / {r['largest_tensor_mb']:.0f}"])  # fmt: skip
        lines.append(markdown_table(["file", "size", "decode tok/s llama.cpp", "decode tok/s lmpress eager",
                                     "prefill tok/s llama.cpp", "prefill tok/s lmpress eager", "export s",
                                     "export peak RSS over loaded / largest tensor (MiB)"], t_rows))  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--llama-bin", default=None, help="directory with llama-imatrix and llama-quantize")
    ap.add_argument("--draws", default="96,128,160", help="calibration window counts of the lmpress rows")
    ap.add_argument("--skip-tinyllama", action="store_true", help="keep the TinyLlama rows of results/gguf.json")
    ap.add_argument("--only-tinyllama", action="store_true", help="keep the built-in rows of results/gguf.json")
    ap.add_argument("--table-only", action="store_true", help="re-render the table from results/gguf.json")
    args = ap.parse_args()
    args.draws = [int(n) for n in args.draws.split(",")]
    if args.table_only:
        payload = json.loads((RESULTS / "gguf.json").read_text())
        write_results("gguf", payload, table(payload))
        return
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lmpress-gguf-bench-"))
    try:
        if args.only_tinyllama:
            payload: dict[str, Any] = json.loads((RESULTS / "gguf.json").read_text())
            payload["machine_tinyllama"] = machine()
        else:
            rows, info = builtin_rows(args, work)
            payload = {"machine": machine(), "info": info, "builtin": rows, "eval": info["eval"]}
        if not args.skip_tinyllama:
            payload["tinyllama"] = tinyllama_rows(args, work)
        elif (RESULTS / "gguf.json").is_file():
            previous = json.loads((RESULTS / "gguf.json").read_text())
            for key in ("tinyllama", "machine_tinyllama"):
                if key in previous:
                    payload[key] = previous[key]
        write_results("gguf", payload, table(payload))
        print(table(payload))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
