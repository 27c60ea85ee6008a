"""The coverage table: every model family x every capability, from actual runs.

    OMP_NUM_THREADS=1 nice python -m benchmarks.coverage [--only gemma,phi3] [--fresh] [--render]

Families: every spec of `lmpress.arch.registry.specs()` and every model type of transformers'
causal-LM mapping. Each is built as a tiny random model (the tests' `tests.conftest.tiny_config`
where the tests have one, else small common sizes), saved with a small tokenizer, and run through
each capability: the post-training method classes (RTN, GPTQ, AWQ, HQQ, W8A8, unstructured
pruning, structured pruning, low rank, vocabulary pruning), streaming (tensor for tensor the same
as the whole run), save and reload (the same logits), and each export in its runtime (GGUF in
llama.cpp, ONNX in ONNX Runtime, compressed-tensors in transformers: logits within a KL bound of
lmpress's own forward). Each cell is ✓, the refusal's one line (an lmpress error: the family cannot
do it and says so), or a failure (anything else: a bug).

Results are cached per family in ``benchmarks/results/coverage.json`` and kept while the family's
spec file is unchanged, so a run resumes where it stopped and picks up new families; ``--fresh``
reruns every family, ``--only`` the named ones, ``--render`` only rewrites the tables. Writes the
table to ``docs/architectures.md`` and the counts to ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import pkgutil
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch

import lmpress
from benchmarks.common import RESULTS, machine, markdown_table, write_results
from lmpress.arch.kinds import has_attention, kind_refusal
from lmpress.arch.registry import specs
from lmpress.errors import LmpressError

DOC = Path(__file__).parent.parent / "docs" / "architectures.md"
RESULT = RESULTS / "coverage.json"
COMMAND = "OMP_NUM_THREADS=1 python -m benchmarks.coverage"
Q4 = {"bits": 4, "group_size": 32}
# column -> the one-stage recipe it runs (None: a check over the GPTQ run or an export)
RECIPES: dict[str, dict[str, Any] | None] = {
    "rtn": {"method": "rtn", **Q4},
    "gptq": {"method": "gptq", **Q4},
    "awq": {"method": "awq", **Q4},
    "hqq": {"method": "hqq", **Q4},
    "w8a8": {"method": "w8a8"},
    "unstructured": {"method": "wanda", "sparsity": 0.5},
    "structured": {"method": "structured", "target": 0.25, "multiple_of": 16},
    "lowrank": {"method": "lowrank", "target": 0.2},
    "stream": None,
    "reload": None,
    "gguf": None,
    "onnx": None,
    "compressed-tensors": None,
    "vocab": {"method": "vocab"},
}
HEADERS = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "hqq": "HQQ",
    "w8a8": "W8A8",
    "unstructured": "unstructured pruning",
    "structured": "structured pruning",
    "lowrank": "low rank",
    "stream": "stream",
    "reload": "save/reload",
    "gguf": "GGUF in llama.cpp",
    "onnx": "ONNX in ONNX Runtime",
    "compressed-tensors": "compressed-tensors in transformers",
    "vocab": "vocab pruning",
}
KL_MAX = {"gguf": 1e-3, "onnx": 1e-4, "compressed-tensors": 1e-4}  # per token, against lmpress's forward
EXPORT_RECIPE = {"method": "rtn", "bits": 8, "group_size": 32, "symmetric": True}  # every runtime has it
# the generic tiny sizes, each passed only where the family's config has the key
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "ffn_dim": 128,
    "n_inner": 128,
    "d_ff": 128,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "shared_expert_intermediate_size": 32,
    "word_embed_proj_dim": 64,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "d_model": 64,
    "num_layers": 2,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    # hybrids: an attention layer among the two (their defaults place the first one further down)
    "attn_layer_indices": [1],
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
}
MLA = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
MAX_PARAMS = 5_000_000  # larger than this with the small sizes: not built tiny
SECONDS = 240  # one capability's limit


def families() -> dict[str, str]:
    """model_type -> "spec" (lmpress has one) or "generic" (transformers' causal-LM mapping only)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "generic")
    out.update(dict.fromkeys(specs(), "spec"))
    return dict(sorted(out.items()))


def spec_key(model_type: str) -> str:
    """A hash of the family's spec file ("" without one): a changed spec reruns the family."""
    return spec_files().get(model_type, "")


@cache
def spec_files() -> dict[str, str]:
    """model_type -> a hash of its family module's source, read once per run (as `specs()` is)."""
    from lmpress.arch import families as package

    out: dict[str, str] = {}
    for spec in {id(s): s for s in specs().values()}.values():
        for info in pkgutil.iter_modules(package.__path__):
            module = sys.modules.get(f"{package.__name__}.{info.name}")
            if module is not None and spec in getattr(module, "SPECS", ()):
                digest = hashlib.sha256(inspect.getsource(module).encode()).hexdigest()[:12]
                out.update(dict.fromkeys(spec.model_types, digest))
                break
    return out


def tiny_config(model_type: str, vocab: int, layers: int = 2) -> Any:
    """The tests' tiny config of the family where they have one, else the small sizes (`SMALL`) with
    ``layers`` blocks."""
    from tests import conftest
    from transformers import AutoConfig

    if model_type in conftest.TINY_ARCHS:
        return conftest.tiny_config(model_type, vocab)
    default = AutoConfig.for_model(model_type)
    kw = {k: v for k, v in {**SMALL, "num_hidden_layers": layers}.items() if hasattr(default, k)}
    if hasattr(default, "kv_lora_rank"):  # latent attention (MLA): keys expanded to every head, none shared
        kw.update({k: v for k, v in MLA.items() if hasattr(default, k)})
        if "num_key_value_heads" in kw:
            kw["num_key_value_heads"] = kw.get("num_attention_heads", 4)
        if hasattr(default, "head_dim"):  # as their configs have it: the rotary part's width
            kw["head_dim"] = MLA["qk_rope_head_dim"]
    return AutoConfig.for_model(model_type, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def first_line(e: BaseException) -> str:
    text = (str(e) or type(e).__name__).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


@contextmanager
def limit(seconds: int) -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cell(fn: Callable[[], str]) -> dict[str, str]:
    """Run one capability: ``{"ok": detail}``, ``{"refused": line}`` (an lmpress error) or
    ``{"failed": line}`` (anything else)."""
    try:
        with limit(SECONDS):
            return {"ok": fn()}
    except LmpressError as e:
        return {"refused": first_line(e)}
    except Exception as e:
        return {"failed": f"{type(e).__name__}: {first_line(e)}"}


def kl(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    return float((la.exp() * (la - lb)).sum(-1).mean())


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()  # type: ignore[no-any-return]


def build(model_type: str, tokenizer: Any, root: Path) -> Path:
    """Save a tiny random model of the family with the tokenizer; an lmpress error says why not."""
    from transformers import AutoModelForCausalLM

    try:
        for layers in (2, 4):  # a hybrid whose first attention layer is the fourth: four blocks
            config = tiny_config(model_type, len(tokenizer), layers)
            with torch.device("meta"):  # counted before any memory is taken: some composite configs are huge
                meta = AutoModelForCausalLM.from_config(config)
            if has_attention(meta):
                break
        n = sum(p.numel() for p in meta.parameters())
        if n > MAX_PARAMS:
            raise LmpressError(f"not built tiny: {n / 1e6:.0f}M parameters with the small sizes (a composite config)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    except LmpressError:
        raise
    except Exception as e:
        raise LmpressError(f"transformers cannot build it from its config class: {first_line(e)}") from None
    out = root / model_type
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def run_family(model_type: str, tokenizer: Any, text: Path, root: Path) -> dict[str, Any]:
    """Every capability of one family (see the module docstring)."""
    from lmpress.export import export
    from lmpress.io.load import LoadedModel
    from lmpress.preflight import why_whole

    t0 = time.perf_counter()
    cells: dict[str, dict[str, str]] = {}
    refusal = cell(lambda: str(kind_refusal(tiny_config(model_type, len(tokenizer)).to_dict()) or ""))
    if refusal.get("ok"):  # not a decoder: said as lmpress says it, whatever its size
        return {"built": "", "cells": {"rtn": {"refused": refusal["ok"]}}, "seconds": 0.0}
    built = cell(lambda: str(build(model_type, tokenizer, root)))
    if "ok" not in built:
        reason = built.get("refused") or built["failed"]
        return {"built": reason, "cells": {}, "seconds": round(time.perf_counter() - t0, 1)}
    src = Path(built["ok"])
    data = lmpress.DataOptions(source=text, seq_len=32, calib_windows=8, eval_windows=2)
    ids = torch.randint(0, len(tokenizer), (1, 32), generator=torch.Generator().manual_seed(0))
    runs: dict[str, Any] = {}

    def method(name: str, stage: dict[str, Any], stream: bool = False) -> Callable[[], str]:
        def go() -> str:
            out = root / f"{model_type}-{name}"
            r = lmpress.compress(
                src, {"stages": [stage]}, data, output=out, stream=stream, run_eval=False, measure_speed=False
            )
            runs[name] = (r, out)
            return ""

        return go

    cells["rtn"] = cell(method("rtn", RECIPES["rtn"] or {}))
    if "ok" not in cells["rtn"]:  # what compresses anything (no data, no roles) does not run: refused
        return {"built": "", "cells": cells, "seconds": round(time.perf_counter() - t0, 1)}
    for name, stage in RECIPES.items():
        if stage is not None and name not in ("rtn", "vocab"):
            cells[name] = cell(method(name, stage, stream=False))

    def stream() -> str:
        name = "gptq" if "gptq" in runs else "rtn"  # GPTQ where it ran (enough tokens for its widths)
        why = why_whole(src, lmpress.recipe.load_recipe({"stages": [RECIPES[name]]}), root / "x")
        if why is not None:
            raise LmpressError(f"whole only: {why}")
        method("stream", RECIPES[name] or {}, stream=True)()
        whole, streamed = (_tensors(runs[k][1]) for k in (name, "stream"))
        same = set(whole) == set(streamed) and all(torch.equal(t, streamed[k]) for k, t in whole.items())
        if not same:
            raise RuntimeError("the streamed result differs from the whole run's")
        return "same tensors as whole"

    def reload() -> str:
        r, out = runs["gptq" if "gptq" in runs else "rtn"]
        diff = (logits(r.model, ids) - logits(lmpress.load(out, device="cpu").model, ids)).abs().max()
        if diff > 1e-5:
            raise RuntimeError(f"reloaded logits differ by {float(diff):.2e}")
        return "same logits"

    def exported(fmt: str) -> Callable[[], str]:
        def go() -> str:
            if "export" not in runs:
                method("export", EXPORT_RECIPE)()
            r, out = runs["export"]
            path = root / (f"{model_type}.gguf" if fmt == "gguf" else f"{model_type}-{fmt}")
            export(LoadedModel(r.model, r.tokenizer, str(out), out), fmt, path)
            theirs = _runtime_logits(fmt, path, ids)
            d = kl(logits(_exact(lmpress.load(out, device="cpu").model), ids), theirs)
            if d > KL_MAX[fmt]:
                raise RuntimeError(f"KL {d:.1e} per token from lmpress's logits (over {KL_MAX[fmt]:.0e})")
            return f"KL {d:.0e}"

        return go

    cells["stream"] = cell(stream)
    cells["reload"] = cell(reload)
    for fmt in ("gguf", "onnx", "compressed-tensors"):
        cells[fmt] = cell(exported(fmt))
    cells["vocab"] = cell(method("vocab", RECIPES["vocab"] or {}))
    return {"built": "", "cells": cells, "seconds": round(time.perf_counter() - t0, 1)}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: t for f in sorted(path.glob("*.safetensors")) for k, t in load_file(f).items()}


def _exact(model: Any) -> Any:
    """lmpress's forward in float32 through its dequantizing path (as tests/export/helpers.py)."""
    from lmpress.nn.quant_linear import QuantLinear

    model = model.float()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act_bits is None:
            m._kernel = ("dequant", None)
    return model


def _runtime_logits(fmt: str, path: Path, ids: torch.Tensor) -> torch.Tensor:
    if fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM

        return logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), ids)
    return logits(lmpress.load(path, device="cpu").model, ids)


def tokenizer_and_text(root: Path) -> tuple[Any, Path]:
    """The tests' 512-token byte-level BPE and a text file of a few thousand tokens."""
    from lmpress.models.reference import train_tokenizer
    from lmpress.sources import load_documents

    docs = load_documents("stdlib")
    tokenizer = train_tokenizer([d for d in docs if d.path in ("json/decoder.py", "json/encoder.py", "abc.py")], 512)
    text = root / "text.txt"
    text.write_text(next(d.text for d in docs if d.path == "json/decoder.py"))
    return tokenizer, text


# ---- the tables ------------------------------------------------------------------------------------


def kind(entry: dict[str, Any]) -> str:
    """first-class (a spec), generic (no spec: compressed through its structure), refused, not built."""
    if entry["built"]:
        return "not built"
    probe = entry["cells"].get("rtn", {})
    if "failed" in probe:
        return "failed"
    if "ok" not in probe:
        return "refused"
    return "first-class" if entry["path"] == "spec" else "generic"


def reason(entry: dict[str, Any], model_type: str, col: str = "rtn") -> str:
    """A cell's refusal or failure (the build's for a family not built), with the family's own name
    taken out so that families refused alike share one line."""
    c = entry["cells"].get(col, {})
    line = entry["built"] or c.get("refused") or ("failed: " + c.get("failed", ""))
    for name in (repr(model_type), model_type):
        line = line.replace(name, "FAMILY")
    return line.replace("|", "/")


class Reasons:
    """Distinct refusal lines, numbered in order of first use (the table's cells cite the number)."""

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}

    def cite(self, line: str) -> int:
        return self.lines.setdefault(line, len(self.lines) + 1)

    def markdown(self) -> str:
        return "\n".join(f"{n}. {line}" for line, n in self.lines.items())


def row(model_type: str, e: dict[str, Any], reasons: Reasons) -> list[str]:
    k = kind(e)
    if k in ("not built", "refused", "failed"):
        return [f"`{model_type}`", f"{k} ({reasons.cite(reason(e, model_type))})", *["-"] * len(RECIPES)]
    out = [f"`{model_type}`", k]
    for col in RECIPES:
        c = e["cells"].get(col)
        if c is None:
            out.append("-")
        elif "ok" in c:
            out.append("✓")
        else:
            word = "refused" if "refused" in c else "**failed**"
            out.append(f"{word} ({reasons.cite(reason(e, model_type, col))})")
    return out


def counts(results: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"first-class": [], "generic": [], "refused": [], "failed": [], "not built": []}
    for model_type, e in results.items():
        out[kind(e)].append(model_type)
    return out


def summary(results: dict[str, Any]) -> str:
    """The benchmarks README section: counts, the families by path, the refusals grouped by reason."""
    c = counts(results)
    failed = sorted(f"`{t}` {col}" for t, e in results.items() for col, v in e["cells"].items() if "failed" in v)
    why: dict[str, list[str]] = {}
    for t in c["refused"] + c["failed"] + c["not built"]:
        why.setdefault(reason(results[t], t), []).append(t)
    ok = sum("ok" in v for e in results.values() for v in e["cells"].values())
    cells = sum(len(e["cells"]) for e in results.values())
    return "\n".join(
        [
            "## Model families (issue 31)",
            "",
            "Every spec and every model type of transformers' causal-LM mapping, each built as a tiny random "
            "model and run through every capability; the table per family is "
            f"[docs/architectures.md](../docs/architectures.md). `{COMMAND}`.",
            "",
            markdown_table(
                ["path", "families", "which"],
                [[k, len(v), ", ".join(v)] for k, v in c.items()],
            ),
            "",
            "Why the refused and unbuilt families are (FAMILY: the family's name):",
            "",
            *[f"- {len(ts)}: {line} ({', '.join(ts)})" for line, ts in sorted(why.items(), key=lambda kv: -len(kv[1]))],
            "",
            f"Cells: {ok} ✓ of {cells} run; {len(failed)} failed (a bug): {', '.join(failed) or 'none'}.",
        ]
    )


def doc(results: dict[str, Any]) -> str:
    c = counts(results)
    reasons = Reasons()
    rows = [row(t, e, reasons) for t, e in results.items()]
    return "\n".join(
        [
            "# Model families: what lmpress does with each",
            "",
            "Generated by `benchmarks/coverage.py` from actual runs on a tiny random model of each family "
            f"(do not edit by hand; regenerate with `{COMMAND}`). "
            f"{len(c['first-class'])} families are first-class (a spec in `src/lmpress/arch/families/`), "
            f"{len(c['generic'])} go through the generic path (blocks and linear layers found by structure; "
            f"the methods that need no roles), {len(c['refused'])} are refused and {len(c['not built'])} "
            "could not be built tiny from their config class.",
            "",
            "A family is refused when RTN, which needs neither data nor roles, does not run on it (the "
            "reason is the number in its row). ✓: ran, and where there is something to compare, matched: "
            "stream, tensor for tensor the whole run's, and save/reload, the same logits (both of the GPTQ "
            "run, RTN's where GPTQ is refused); each export, logits in its runtime within KL "
            + ", ".join(f"{v:.0e} ({HEADERS[k]})" for k, v in KL_MAX.items())
            + " per token of lmpress's own. refused (n): lmpress's one-line refusal, number n below. "
            "**failed** (n): an error that is not a refusal (a bug). Methods: W4 g32 (RTN, GPTQ, AWQ, HQQ), "
            "W8A8 with smoothing, Wanda 50%, structured 25%, low rank 20%; exports are of an RTN W8 g32 model.",
            "",
            "A model whose family is not listed and that transformers builds goes through the generic path; "
            "`lmpress inspect MODEL` says which path it takes and what each method can do with it.",
            "",
            markdown_table(["family", "path", *HEADERS.values()], rows),
            "",
            "Refusals and failures (FAMILY: the family's name):",
            "",
            reasons.markdown(),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model types to (re)run")
    parser.add_argument("--fresh", action="store_true", help="rerun every family measured before this run")
    parser.add_argument("--reverse", action="store_true", help="from z to a (a second run sharing the work)")
    parser.add_argument("--since", type=float, default=0.0, help="rerun every family measured before this epoch")
    parser.add_argument("--render", action="store_true", help="only rewrite the tables from the results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, wanted = (time.time() if args.fresh else args.since), families()
    only = [t for t in args.only.split(",") if t]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tokenizer, text = (None, root) if args.render else tokenizer_and_text(root)
        for model_type, path in sorted(wanted.items(), reverse=args.reverse):
            if args.render or (only and model_type not in only):
                continue
            key, old = spec_key(model_type), _read().get(model_type)  # read again: another run may share the file
            same = bool(old) and old.get("spec_key") == key and old.get("path") == path  # type: ignore[union-attr]
            if not only and same and old.get("measured", 0) >= start:  # type: ignore[union-attr]
                continue
            print(f"{model_type} ({path})", flush=True)
            entry = run_family(model_type, tokenizer, text, root / model_type)
            entry = {"path": path, "spec_key": key, "measured": time.time(), **entry}
            print(f"  {kind(entry)} in {entry['seconds']} s", flush=True)
            shutil.rmtree(root / model_type, ignore_errors=True)
            _write(wanted, {model_type: entry})
    _write(wanted, {})


def _read() -> dict[str, Any]:
    return json.loads(RESULT.read_text()).get("families", {}) if RESULT.exists() else {}  # type: ignore[no-any-return]


def _write(wanted: dict[str, str], new: dict[str, Any]) -> None:
    """Merge ``new`` into the results on disk (runs may share them) and rewrite both tables."""
    merged = {**_read(), **new}
    results = {t: merged[t] for t in wanted if t in merged}
    write_results("coverage", {"machine": machine(), "families": results}, summary(results))
    DOC.write_text(doc(results))


if __name__ == "__main__":
    main()
