"""Models bigger than memory: streaming compression against the whole-model path, at real shapes.

    python -m benchmarks.scale [--threads 2] [--shape tinyllama|llama3-8b ...] [--calib-windows 32]
                               [--eval-windows 64] [--table-only]

Each shape's model is generated with random weights straight to disk (bf16, one shard per few
blocks, so generation holds one tensor at a time). Each run is a child process (``lmpress compress
... --json``), whose peak resident memory is read from its own ``VmHWM`` while it runs (not
``ru_maxrss``, which a child inherits from its parent); speed timing is off in both
(``--no-speed``: it needs a whole model), evaluation is on. TinyLlama-1.1B: GPTQ W4 g128 streamed
and whole, wall time and peak memory each, whether their output tensors are identical, and the
streamed output reloaded with ``lmpress.load`` and generating (peak memory against its bytes on
disk). Any
shape: ``--max-memory`` set below the estimate is refused before any work (and nothing written).

Writes ``benchmarks/results/scale.json`` and the ``scale`` table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, markdown_table, write_results

SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    },
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    },
    # issue 31's families at their deployed shapes (random weights, the family's own architecture)
    "gemma3-1b": {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
        "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "sliding_window": 512,
        "tie_word_embeddings": True,
    },
    "phi4-mini": {
        "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
    },
    "smoke": {  # a quick check of this script
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 512,
    },
}  # fmt: skip


def generate(shape: str, out: Path) -> int:
    """Write a random-weight model of ``shape`` (a Llama unless it names its ``model_type``; bf16) to
    ``out`` a tensor at a time; returns its bytes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import lmpress
    from lmpress.io.tensors import INDEX_FILE, parameters_on_meta

    out.mkdir(parents=True)
    sizes = {"tie_word_embeddings": False, **SHAPES[shape]}
    model_type = sizes.pop("model_type", "llama")
    cfg = AutoConfig.for_model(model_type, **sizes, bos_token_id=0, eos_token_id=0, dtype="bfloat16")
    cfg.save_pretrained(out)
    lmpress.load("builtin").tokenizer.save_pretrained(out)  # 4096 tokens; the other rows are never read
    with parameters_on_meta():  # the architecture on meta names every tensor and its shape
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()
    shapes, seen = [], set()
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied head is saved once, as the embeddings
            shapes.append((k, tuple(t.shape)))
            seen.add(id(t))
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0
    for i, (k, shp) in enumerate(shapes):
        t = torch.ones(shp) if k.endswith("norm.weight") else torch.randn(shp, generator=gen) * 0.02
        shard[k] = t.to(torch.bfloat16)
        size += shard[k].nbytes
        if size > 2**30 or i == len(shapes) - 1:
            n += 1
            name = f"part-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


CALIB_WINDOWS, EVAL_WINDOWS = 32, 64  # the 1.1B run; the 8B run asks for 16/16


def vm_hwm(pid: int | str = "self", key: str = "VmHWM") -> int | None:
    """A process's own peak resident memory (``VmHWM``, bytes; ``key="VmRSS"``: its present one),
    or None once it has exited.

    Not ``ru_maxrss``: Linux carries the parent's high-water mark over into a child across
    fork/exec, so a child started by a process that was ever big reports the parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run(args: list[str], threads: int, cache: Path | None = None) -> dict[str, Any]:
    """``lmpress ARGS`` in a child process: its exit code, wall time, peak RSS (its VmHWM, read
    every 50 ms until it exits) and JSON output. ``cache``: lmpress's cache of measured originals
    (default: an empty one, a cold run)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMPRESS_TRACK": "0"}
    t0 = time.perf_counter()
    with (
        tempfile.TemporaryFile("w+") as out_f,
        tempfile.TemporaryFile("w+") as err_f,
        tempfile.TemporaryDirectory() as cold,
    ):
        env["LMPRESS_CACHE"] = str(cache or cold)
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "lmpress"), *args, "--threads", str(threads)],
            env=env,
            stdout=out_f,
            stderr=err_f,
            text=True,
        )
        peak, rss, last = 0, [], 0.0  # rss: (seconds, MB) every 10 s, where the memory goes in time
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid) or 0)
            if time.perf_counter() - last >= 10:
                last = time.perf_counter()
                rss.append((round(last - t0), (vm_hwm(proc.pid, "VmRSS") or 0) // 2**20))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    out: dict[str, Any] = {"rc": proc.returncode, "seconds": wall, "peak_rss": peak or None, "rss_mb": rss}
    if proc.returncode == 0 and "--json" in args:
        out["json"] = json.loads(stdout)
    else:
        out["message"] = (stdout + stderr).strip().splitlines()[-1:]
    return out


RELOAD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import lmpress
t0 = time.perf_counter()
m = lmpress.load(sys.argv[1], device="cpu")
ids = m.tokenizer("def main(argv):", return_tensors="pt").input_ids
with torch.no_grad():
    out = m.model.generate(ids, max_new_tokens=8, do_sample=False)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "new_tokens": out.shape[1] - ids.shape[1], "peak_rss": hwm}))
"""


def reload_row(out: Path, threads: int) -> dict[str, Any]:
    """Load a compressed directory with ``lmpress.load`` in a child process and generate 8 tokens:
    its peak resident memory against the directory's bytes on disk."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LMPRESS_TRACK": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(threads)], env=env, capture_output=True, text=True
    )
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    if proc.returncode != 0:
        return {"rc": proc.returncode, "message": proc.stderr.strip().splitlines()[-1:], "bytes_on_disk": on_disk}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rc": 0, **r, "bytes_on_disk": on_disk}


def identical(a: Path, b: Path) -> bool:
    from lmpress.io.tensors import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.keys()) != set(cb.keys()):
        return False
    return all(torch.equal(ca.tensor(k), cb.tensor(k)) for k in ca.where)


def shape_rows(shape: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    src = work / shape
    nbytes = generate(shape, src)
    common = ["-r", "w4", "--calib-windows", str(args.calib_windows), "--max-windows", str(args.eval_windows)]
    common += ["--no-speed", "--samples", "0", "--json"]
    rows = []
    modes = ("stream", "no-stream") if shape in ("tinyllama", "smoke") else ("stream",)  # bigger: stream only
    cache = work / "cache"  # the streamed run's: a second streamed run finds the original measured
    for mode in modes:
        out = work / f"{shape}-{mode}"
        r = run(["compress", str(src), *common, "-o", str(out), f"--{mode}"], args.threads, cache)
        row = {"shape": shape, "run": mode, "model_bytes": nbytes, "rc": r["rc"], "seconds": r["seconds"]}
        row["threads"] = args.threads
        row.update(calib_windows=args.calib_windows, eval_windows=args.eval_windows)
        row.update(peak_rss=r["peak_rss"], rss_mb=r["rss_mb"])
        if r["rc"] == 0:
            m = r["json"]["metrics"]
            row.update(kl=m["compressed"]["kl"], bytes_out=m["compressed"]["bytes_on_disk"])
        else:
            row["message"] = r["message"]
        rows.append(row)
    if len(modes) == 2 and all(r["rc"] == 0 for r in rows):
        rows[0]["identical_to_whole"] = identical(work / f"{shape}-stream", work / f"{shape}-no-stream")
        # compressing the same model again (another recipe, say): its original's blocks are not run
        out = work / f"{shape}-again"
        r = run(["compress", str(src), *common, "-o", str(out), "--stream"], args.threads, cache)
        again = {"shape": shape, "run": "stream, again (original cached)", "model_bytes": nbytes, **r}
        again.update(calib_windows=args.calib_windows, eval_windows=args.eval_windows)
        if r["rc"] == 0:
            m = again.pop("json")["metrics"]
            again.update(kl=m["compressed"]["kl"], bytes_out=m["compressed"]["bytes_on_disk"])
            again["identical_to_whole"] = identical(out, work / f"{shape}-no-stream")
        rows.insert(1, again)
        shutil.rmtree(out, ignore_errors=True)
    if rows[0]["rc"] == 0:  # the streamed output reloads and generates
        rows[0]["reload"] = reload_row(work / f"{shape}-stream", args.threads)
    for mode in modes:
        shutil.rmtree(work / f"{shape}-{mode}", ignore_errors=True)
    budget = {"llama3-8b": "3GB", "tinyllama": "0.5GB"}.get(shape, "0.3GB")
    out = work / f"{shape}-refused"
    r = run(["compress", str(src), *common[:-1], "-o", str(out), "--max-memory", budget], args.threads)
    rows.append(
        {"shape": shape, "run": f"--max-memory {budget}", "model_bytes": nbytes, "rc": r["rc"], "seconds": r["seconds"],
         "message": r.get("message"), "nothing_written": not out.exists(),
         "calib_windows": args.calib_windows, "eval_windows": args.eval_windows, "threads": args.threads}
    )  # fmt: skip
    shutil.rmtree(src, ignore_errors=True)
    return rows


def reload_rows(shape: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Only the reload check: a streamed RTN W4 g128 run (the same int4 format as GPTQ's, in
    minutes), then its output loaded and generating in a child process."""
    src, out = work / shape, work / f"{shape}-rtn"
    nbytes = generate(shape, src)
    recipe = work / "rtn-w4.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    bits: 4\n    group_size: 128\n")
    r = run(["compress", str(src), "-r", str(recipe), "-o", str(out), "--no-eval", "--stream"], args.threads)
    row: dict[str, Any] = {"shape": shape, "run": "reload (RTN W4 g128 output)", "model_bytes": nbytes, **r}
    if r["rc"] == 0:
        row.pop("message", None)
        row["reload"] = reload_row(out, args.threads)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return [row]


def windows_note(row: dict[str, Any], threads: int = 2) -> str:
    """' (16/16 windows)' for a row run on other calibration/evaluation windows than the defaults,
    ', 1 thread' on another thread count than the table's."""
    c, e = row.get("calib_windows", CALIB_WINDOWS), row.get("eval_windows", EVAL_WINDOWS)
    note = "" if (c, e) == (CALIB_WINDOWS, EVAL_WINDOWS) else f" ({c}/{e} windows)"
    n = row.get("threads", threads)
    return note + ("" if n == threads else f", {n} thread{'s' if n > 1 else ''}")


def table(payload: dict[str, Any]) -> str:
    head = ["shape", "run", "model GB", "wall s", "peak RSS GB", "RSS / model", "KL", "result"]
    rows = []
    for r in payload["rows"]:
        peak = r.get("peak_rss")
        result = "refused: " + r["message"][0] if r.get("message") else ("ok" if r["rc"] == 0 else f"rc {r['rc']}")
        if "identical_to_whole" in r:
            result += ", tensors identical to whole" if r["identical_to_whole"] else ", tensors DIFFER"
        if "nothing_written" in r:
            result += " (nothing written)" if r["nothing_written"] else " (OUTPUT LEFT)"
        if r.get("reload", {}).get("rc") == 0:
            re = r["reload"]
            result += (
                f"; reloads and generates with a peak of {re['peak_rss'] / 1e9:.2f} GB "
                f"({re['peak_rss'] / re['bytes_on_disk']:.2f}x its {re['bytes_on_disk'] / 1e9:.2f} GB on disk)"
            )
        rows.append([
            r["shape"], r["run"] + windows_note(r, payload["threads"]), f"{r['model_bytes'] / 1e9:.2f}",
            f"{r['seconds']:.0f}",
            f"{peak / 1e9:.2f}" if peak else "", f"{peak / r['model_bytes']:.2f}x" if peak else "",
            f"{r['kl']:.4f}" if "kl" in r else "", result,
        ])  # fmt: skip
    note = (
        f"GPTQ W4 g128 (`-r w4`), {payload['calib_windows']} calibration and {payload['eval_windows']} evaluation "
        f"windows of 256 tokens unless a row says otherwise, random bf16 weights, {payload['threads']} threads, speed "
        "timing off; peak RSS is the child process's own high-water mark (VmHWM)."
    )
    return (
        "## Streaming: models bigger than memory (`benchmarks/scale.py`)\n\n"
        + note
        + "\n\n"
        + markdown_table(head, rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS)
    ap.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--reload-only", action="store_true", help="only the reload check (an RTN W4 output)")
    args = ap.parse_args()
    path = RESULTS / "scale.json"
    if args.table_only:
        payload = json.loads(path.read_text())
    else:
        shapes = args.shape or ["tinyllama"]
        previous = json.loads(path.read_text()) if path.exists() else {}
        rows_of = reload_rows if args.reload_only else shape_rows
        with tempfile.TemporaryDirectory(prefix="lmpress-scale-", dir=Path.cwd()) as tmp:
            rows = [row for s in shapes for row in rows_of(s, args, Path(tmp))]
        if args.reload_only:
            kept = [r for r in previous.get("rows", []) if not (r["shape"] in shapes and r["run"].startswith("reload"))]
        else:
            kept = [r for r in previous.get("rows", []) if r["shape"] not in shapes]
        payload = {
            **previous,
            "machine": machine(),
            "threads": previous.get("threads", args.threads),  # the table's; a row run on others says so
            "calib_windows": CALIB_WINDOWS,  # the table's defaults; each row holds its own
            "eval_windows": EVAL_WINDOWS,
            "rows": kept + rows,
        }
    write_results("scale", payload, table(payload))
    print(table(payload))


if __name__ == "__main__":
    main()
