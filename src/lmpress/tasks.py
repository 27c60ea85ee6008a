"""Standard task scores (HellaSwag, ARC, MMLU, WikiText …) through lm-evaluation-harness.

lmpress hands the model it loaded — any of its formats (packed, sparse, codebook), a GGUF file run
by llama.cpp or an ONNX graph run by ONNX Runtime — to lm-eval as `ModelLM`, an
`lm_eval.api.model.LM` that scores text with the model's own forward. A task therefore sees exactly
the model lmpress measured, and lm-eval does what it is best at: the task definitions, prompts,
few-shot sampling and metrics.

Scoring follows lm-eval's `HFLM` so the numbers compare with published ones: a continuation's
tokens are those of ``encode(context + continuation)`` after ``encode(context)``, no special tokens
are added, an empty context is the end-of-text token, and inputs longer than the model's context
keep their last tokens. Sequences are right-padded into batches; a causal model's logits at a
position do not depend on what follows it, so padding changes no score.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmpress.errors import DataError, LmpressError
from lmpress.progress import track

__all__ = ["ModelLM", "TaskScores", "run_tasks", "score_tokens"]

log = logging.getLogger(__name__)

EXTRA = "pip install 'lmpress[lm-eval]'"


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError:
        raise LmpressError(f"standard tasks run through lm-evaluation-harness: {EXTRA}") from None
    return lm_eval


@dataclass
class TaskScores:
    """Scores of one model: ``scores[task][metric]`` and the bootstrap standard errors beside them."""

    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # documents scored per task

    def flat(self) -> dict[str, float]:
        """``{"task/metric": value}``, as the tracker logs metrics."""
        return {f"{t}/{m}": v for t, ms in self.scores.items() for m, v in ms.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "stderr": self.stderr, "samples": self.samples}


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def score_tokens(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_length: int = 2048,
    progress: str | None = None,
) -> list[tuple[float, bool]]:
    """Log-probability of each continuation after its context, and whether greedy decoding would
    produce it: ``pairs`` are (context ids, continuation ids), the context never empty. With
    ``progress`` (a label) a bar counts the batches."""
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    inputs = []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("score_tokens needs a non-empty context and continuation")
        whole = (ctx + cont)[-(max_length + 1) :]
        inputs.append(whole[:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))  # long first: the first batch fails fast
    device = _device(model)
    starts = range(0, len(order), batch_size)
    for start in track(starts, progress or "", enabled=progress is not None):
        rows = order[start : start + batch_size]
        width = len(inputs[rows[0]])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i])
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        for r, i in enumerate(rows):
            cont = pairs[i][1]
            end = len(inputs[i])
            n = min(len(cont), end)
            logp = F.log_softmax(logits[r, end - n : end].float(), dim=-1).cpu()  # (n, V)
            target = torch.tensor(cont[-n:])
            total = float(logp.gather(-1, target[:, None]).sum())
            out[i] = (total, bool((logp.argmax(-1) == target).all()))
    return [o for o in out if o is not None]


def _split_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing spaces of the context belong to the continuation (as lm-eval's HFLM does)."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _lm_base() -> type:
    return _lm_eval().api.model.LM  # type: ignore[no-any-return]


class ModelLM:
    """An lm-eval language model over any lmpress-loaded model; built by `model_lm` so that
    lm-eval is imported only when tasks run."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        progress: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.progress = progress
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        config = getattr(model, "config", None)
        self.max_length = max_length or int(getattr(config, "max_position_embeddings", 0) or 2048)
        prefix = getattr(tokenizer, "eos_token_id", None)
        if prefix is None:
            prefix = getattr(tokenizer, "bos_token_id", None)
        if prefix is None:
            raise DataError("the tokenizer has no end-of-text or beginning token to score text from an empty context")
        self.prefix = int(prefix)
        self.max_gen_toks = 256

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix], self._encode(continuation)
        context, continuation = _split_space(context, continuation)
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx) :]

    # lm-eval's three request types
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        return score_tokens(self.model, pairs, self.batch_size, self.max_length, self.progress)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for r in track(requests, self.progress or "", enabled=self.progress is not None):
            tokens = self._encode(r.args[0])
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(tokens, self.prefix, self.max_length, context_len=1)
            ]
            totals.append(sum(s for s, _ in score_tokens(self.model, windows, self.batch_size, self.max_length)))
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation until a stop string or ``max_gen_toks`` tokens."""
        out = []
        device = _device(self.model)
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self._encode(context) or [self.prefix])[-(self.max_length - 1) :]
            start, text = len(ids), ""
            for _ in range(limit):
                window = torch.tensor([ids[-self.max_length :]], device=device)
                nxt = int(self.model(input_ids=window, use_cache=False).logits[0, -1].argmax())
                if nxt == self.prefix:
                    break
                ids.append(nxt)
                text = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


def model_lm(
    model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None, progress: str | None = None
) -> Any:
    """A `ModelLM` that is also an ``lm_eval.api.model.LM`` (lm-eval checks the type)."""
    lm_class = type("LmpressLM", (ModelLM, _lm_base()), {})
    return lm_class(model, tokenizer, batch_size, max_length, progress)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "evaluate", "absl", "huggingface_hub", "fsspec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def _quiet_run() -> Iterator[None]:
    """lm-eval's bar over building requests and the datasets library's bars stay off (lmpress shows
    one bar over the scoring), and so does lm-eval's environment survey: ``git describe`` (which
    prints to the terminal outside a repository) and torch's collect_env (seconds of subprocesses);
    lmpress records its own provenance."""
    import datasets
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module

    datasets.disable_progress_bars()
    saved = (task_module.tqdm, evaluator_module.get_git_commit_hash, evaluator_module.add_env_info)
    task_module.tqdm = lambda items, **_: items  # type: ignore[assignment]
    evaluator_module.get_git_commit_hash = lambda: None  # type: ignore[assignment]
    evaluator_module.add_env_info = lambda storage: None  # type: ignore[assignment]
    try:
        yield
    finally:
        task_module.tqdm, evaluator_module.get_git_commit_hash, evaluator_module.add_env_info = saved
        datasets.enable_progress_bars()


def _task_manager(include_path: Sequence[Path] | None) -> Any:
    from lm_eval.tasks import TaskManager

    for p in include_path or ():
        if not Path(p).is_dir():
            raise DataError(f"task directory {p} does not exist; give a directory of lm-eval task YAML files")
    paths = [str(p) for p in include_path or ()]
    return TaskManager(include_path=paths or None)


def check_tasks(tasks: Sequence[str], include_path: Sequence[Path] | None = None) -> Any:
    """Fail before any model is loaded: lm-eval missing, no task named, a name lm-eval does not know."""
    _lm_eval()
    _quiet_lm_eval()
    if not tasks:
        raise DataError("no task named; give --tasks NAME[,NAME…] (for example hellaswag,arc_easy)")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = [m for t in unknown for m in difflib.get_close_matches(t, known, n=3)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise DataError(
            f"lm-eval has no task {', '.join(unknown)}{hint}; list them with `lm-eval ls tasks`, "
            "or give --task-path DIR with your own task YAML"
        )
    return manager


def _metric_name(key: str) -> tuple[str, bool]:
    """``"acc,none"`` -> ("acc", False); ``"acc_stderr,none"`` -> ("acc", True)."""
    name, _, flt = key.partition(",")
    stderr = name.endswith("_stderr")
    name = name.removesuffix("_stderr")
    return (name if flt in ("", "none") else f"{name},{flt}"), stderr


def _collect(results: dict[str, Any]) -> TaskScores:
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name, is_err = _metric_name(key)
            (stderr if is_err else scores).setdefault(task, {})[name] = float(value)
    samples = {t: int(n.get("effective", n.get("original", 0))) for t, n in results.get("n-samples", {}).items()}
    return TaskScores(scores, stderr, samples)


def _dataset_error(e: Exception) -> LmpressError | None:
    """A task whose dataset is on the Hugging Face hub, on a machine that cannot reach it."""
    text = f"{type(e).__name__}: {e}"
    markers = ("ConnectionError", "offline", "resolve", "Couldn't reach", "Max retries", "HF_HUB_OFFLINE")
    if isinstance(e, ConnectionError | TimeoutError) or any(m in text for m in markers):
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return DataError(
            f"a task's dataset could not be downloaded ({first[:160]}); run where the Hugging Face hub is "
            "reachable, or give --task-path DIR with a task over local files"
        )
    return None


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: Sequence[Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    manager: Any = None,
    seed: int = 1234,
    progress: str | None = None,
) -> TaskScores:
    """Score ``model`` on lm-eval ``tasks``; ``limit`` documents per task (all when None). With
    ``progress`` (a label) one bar counts the scored batches; lm-eval's own bars stay off."""
    lm_eval = _lm_eval()
    _quiet_lm_eval()
    manager = manager or check_tasks(tasks, include_path)
    lm = model_lm(model, tokenizer, batch_size, max_length, progress)
    try:
        with _quiet_run():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except Exception as e:
        err = _dataset_error(e)
        if err is None:
            raise
        raise err from None
    if results is None:
        raise LmpressError("lm-eval returned no results")
    return _collect(results)
