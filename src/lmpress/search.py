"""``search``: find the recipe that fits a budget (size, quality, speed), with Optuna.

A trial is a recipe built from the search space: a weight quantizer and its bits per *block group*
(the decoder blocks cut into ``block_groups`` contiguous runs), group size, the head's and the
token embeddings' bits, and optionally SparseGPT sparsity and dropped blocks before it.

- **Objective.** Held-out perplexity (or KL against the original) under ``max_bytes`` /
  ``min_speedup``; or, with only ``max_ppl_increase``, the smallest model within it; or both at once
  (``multi_objective``: NSGA-II, the Pareto front). Constraints are Optuna constraints, so TPE
  learns where the feasible region is.
- **Selection is not evaluation.** Trials are scored on calibration-split windows the calibration
  did not use; the winner is measured again on the evaluation split, like every other result.
- **Cheap before expensive.** Each trial's size is known before any calibrated work: the recipe is
  first applied with round-to-nearest (same formats, same bytes), and a trial over ``max_bytes`` is
  pruned there. The *sensitivity cache* (each block group's, the head's and the embeddings' KL when
  only they are rounded to b bits, measured once per model and kept in ``sensitivity.json``)
  predicts a trial's KL as the sum of its parts; a trial predicted far outside ``max_ppl_increase``
  is pruned before calibration, and the search starts from sensitivity-guided seeds.
- **Durable.** The study lives in a database (SQLite in the study directory, or any Optuna storage
  URL): an interrupted search resumes where it stopped, and several worker processes (or machines)
  can share one study.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from lmpress.errors import LmpressError
from lmpress.evaluation import quality, tensor_bytes
from lmpress.io import write_json_atomic
from lmpress.method import Context
from lmpress.models.adapters import Adapter
from lmpress.pipeline import run_stages
from lmpress.recipe import parse_recipe

log = logging.getLogger(__name__)
QUANTIZERS = ("gptq", "rtn", "awq", "hqq")
Bits = Annotated[int, Field(ge=2, le=8)]


class SearchError(LmpressError):
    """A search that cannot be run as asked."""


class SearchSpace(BaseModel):
    """What a trial may choose (a YAML search file narrows it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: list[str] = ["gptq"]  # weight quantizers to choose from
    bits: list[Bits] = [2, 3, 4, 8]  # per block group
    group_sizes: list[Annotated[int, Field(gt=0)]] = [64, 128]
    block_groups: int = Field(2, ge=1)  # contiguous runs of blocks that choose their bits separately
    head_bits: list[Bits | None] = [None, 8, 4]  # None: the head stays as it is
    embedding_bits: list[Bits | None] = [None, 8, 4]
    # per block group: SparseGPT with joint codes at the group's bits; 0: dense
    sparsity: list[Annotated[float, Field(ge=0, lt=1)]] = [0.0]
    drop_blocks: list[Annotated[int, Field(ge=0)]] = [0]  # blocks to drop (which ones: the least important, measured)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in QUANTIZERS]
        if bad:
            raise ValueError(f"unknown method {bad[0]!r} in the search space; choose from {', '.join(QUANTIZERS)}")
        return v

    @field_validator("bits", "group_sizes", "head_bits", "embedding_bits", "sparsity", "drop_blocks", "methods")
    @classmethod
    def _not_empty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("an empty list leaves nothing to search; give at least one value")
        return v


class Budget(BaseModel):
    """Hard limits a result must meet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int | None = Field(None, gt=0)
    max_ppl_increase: float | None = Field(None, gt=0)  # a share: 0.05 = at most 5% worse perplexity
    min_speedup: float | None = Field(None, gt=0)  # tokens/s against the original's (see `speed`)
    speed: Literal["decode", "prefill"] = "decode"  # which speed min_speedup and the speedup objective mean


class Recovery(BaseModel):
    """Recovery training after the post-training search: the best ``top_k`` candidates are distilled
    against the original (codes trained: QAT), and compete with the rest as trials of their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(0, ge=0)  # optimizer steps per candidate; 0: no recovery
    top_k: int = Field(2, ge=1)  # candidates refined
    codes: Literal["train", "frozen"] = "train"  # train the codes (QAT), or keep them and learn the scales
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(16, ge=1)

    def stage(self) -> dict[str, Any]:
        """The recipe stage appended to a candidate."""
        stage: dict[str, Any] = {"method": "distill", "codes": self.codes, "steps": self.steps, "lr": self.lr}
        if self.codes == "train":
            stage["scale_lr"] = 1e-6  # QAT's measured default: the scales barely move, the codes do
        stage.update(batch_size=self.batch_size, eval_every=max(1, self.steps // 4), eval_windows=16)
        return stage


@dataclass
class Evaluator:
    """Applies a trial's recipe to a copy of the model and measures it on the selection windows."""

    model: nn.Module
    tokenizer: Any
    calib: Any  # TokenData used for calibration
    select_windows: Tensor  # calibration-split windows the calibration does not use
    base_ppl: float
    train: Any = None  # TokenData of the train split, for recovery stages

    def compress(self, recipe: dict[str, Any], start: nn.Module | None = None) -> tuple[nn.Module, int]:
        """A copy of ``start`` (default: the original) with the recipe's stages applied, and its bytes."""
        model = copy.deepcopy(self.model if start is None else start)
        if not recipe["stages"]:
            return model, tensor_bytes(model)
        ctx = Context(
            tokenizer=self.tokenizer,
            device=next(self.model.parameters()).device,  # where the model is: a GPU search calibrates there
            calibration=lambda: self.calib,
            training=(lambda: self.train) if self.train is not None else None,
            teacher=self.model,
        )
        run_stages(model, parse_recipe(recipe), ctx)
        return model, tensor_bytes(model)

    def measure(self, model: nn.Module, windows: Tensor | None = None) -> dict[str, float]:
        return quality(model, self.select_windows if windows is None else windows, reference=self.model, batch_size=16)


def calibration_and_selection(every: Any, calib_windows: int, select_windows: int) -> Any:
    """``every`` (all windows of the calibration split) cut into what `run_search` takes: first the
    ``calib_windows`` windows a compress run with that many calibration windows uses (spread evenly,
    as `lmpress.data.windows` picks them), then ``select_windows`` others, spread over the rest. So
    the found recipe, run alone with ``calib_windows``, calibrates on exactly the trial's windows."""
    import dataclasses

    n = every.windows.shape[0]
    if n < calib_windows + select_windows:
        raise SearchError(
            f"search: {n} calibration-split windows, need {calib_windows + select_windows} ({calib_windows} to "
            f"calibrate + {select_windows} to select on); give more text or fewer windows"
        )
    from lmpress.data import spread

    chosen = spread(n, calib_windows)  # the windows `load_windows(..., calib_windows)` returns
    rest = torch.ones(n, dtype=torch.bool)
    rest[chosen] = False
    others = rest.nonzero().squeeze(1)
    picked = others[spread(len(others), select_windows)]
    return dataclasses.replace(every, windows=torch.cat([every.windows[chosen], every.windows[picked]]))


def blocks_pattern(prefix: str, blocks: list[int]) -> str:
    """A target pattern for every layer inside the given decoder blocks (``prefix``: the blocks' module path)."""
    escaped = prefix.replace(".", r"\.")
    return f"re:{escaped}\\.({'|'.join(str(b) for b in blocks)})\\..*"


def block_groups(n_blocks: int, groups: int) -> list[list[int]]:
    """``groups`` contiguous runs of block indices (the first runs one longer when uneven)."""
    groups = min(groups, n_blocks)
    base, extra = divmod(n_blocks, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def build_recipe(choice: dict[str, Any], blocks_prefix: str, groups: list[list[int]], name: str) -> dict[str, Any]:
    """The recipe of one set of choices.

    Stage order is fixed where it matters: blocks are dropped first (nothing is calibrated for a block
    that goes), a sparse group is pruned and quantized *jointly* by SparseGPT (its codes are chosen with
    the mask, one pass; quantizing a pruned layer afterwards would not touch its sparse storage), and
    the quantizer then takes the dense groups, the head and the embeddings. Block groups are runs of
    the blocks that *remain* after dropping."""
    stages: list[dict[str, Any]] = []
    n_blocks = sum(len(g) for g in groups)
    if choice.get("drop_blocks"):
        stages.append({"method": "drop_blocks", "blocks": choice["drop_blocks"]})
        groups = block_groups(n_blocks - choice["drop_blocks"], len(groups))
    dense = []
    for g, blocks in enumerate(groups):
        sparsity = choice.get(f"sparsity_g{g}", 0.0)
        if sparsity:
            stages.append(
                {
                    "method": "sparsegpt",
                    "sparsity": sparsity,
                    "bits": choice[f"bits_g{g}"],
                    "group_size": choice["group_size"],
                    "targets": [blocks_pattern(blocks_prefix, blocks)],
                }
            )
        else:
            dense.append(g)
    if not dense and not choice.get("head_bits"):
        return {"name": name, "description": "found by lmpress search", "stages": stages}  # nothing left to quantize
    first = choice[f"bits_g{dense[0]}"] if dense else choice["head_bits"]
    overrides = [
        {"targets": [blocks_pattern(blocks_prefix, groups[g])], "bits": choice[f"bits_g{g}"]}
        for g in dense[1:]
        if choice[f"bits_g{g}"] != first
    ]
    quant: dict[str, Any] = {"method": choice["method"], "bits": first, "group_size": choice["group_size"]}
    if choice.get("head_bits"):
        quant["ignore"] = []
        overrides.append({"targets": ["lm_head"], "bits": choice["head_bits"]})
    if choice.get("embedding_bits"):
        quant["embedding_bits"] = choice["embedding_bits"]
    if overrides:
        quant["overrides"] = overrides
    stages.append(quant)
    return {"name": name, "description": "found by lmpress search", "stages": stages}


def as_rtn(recipe: dict[str, Any]) -> dict[str, Any]:
    """The same formats, fast: every calibrated quantizer replaced by round-to-nearest. SparseGPT stays
    (its sparse, jointly quantized storage has no cheaper stand-in of the same size)."""
    out = copy.deepcopy(recipe)
    for s in out["stages"]:
        if s["method"] in QUANTIZERS:
            s["method"] = "rtn"
    return out


# ---- sensitivity --------------------------------------------------------------------------------


def sensitivity(
    ev: Evaluator, space: SearchSpace, groups: list[list[int]], prefix: str, cache: Path | None
) -> dict[str, float]:
    """KL when only one part is changed (cached): rounded to b bits (``g{i}@{b}``, ``head@{b}``,
    ``embed@{b}``), a block group pruned to sparsity s (``g{i}@s{s}``), k blocks dropped (``drop@{k}``)."""
    if cache is not None and cache.is_file():
        return dict(json.loads(cache.read_text()))
    out: dict[str, float] = {}
    gs = max(space.group_sizes)
    for b in sorted(set(space.bits) | {x for x in space.head_bits + space.embedding_bits if x}):
        for g, blocks in enumerate(groups):
            stage = {"method": "rtn", "bits": b, "group_size": gs, "targets": [blocks_pattern(prefix, blocks)]}
            out[f"g{g}@{b}"] = _kl_of(ev, stage)
        out[f"head@{b}"] = _kl_of(
            ev, {"method": "rtn", "bits": b, "group_size": gs, "targets": ["lm_head"], "ignore": []}
        )
        out[f"embed@{b}"] = _embed_kl(ev, b, gs)
    for sp in sorted(x for x in space.sparsity if x):  # pruning alone (dense codes' share is the bits' entry)
        for g, blocks in enumerate(groups):
            out[f"g{g}@s{sp:g}"] = _kl_of(
                ev, {"method": "sparsegpt", "sparsity": sp, "targets": [blocks_pattern(prefix, blocks)]}
            )
    for k in sorted(x for x in space.drop_blocks if x):
        out[f"drop@{k}"] = _kl_of(ev, {"method": "drop_blocks", "blocks": k})
    if cache is not None:
        write_json_atomic(cache, out)
    return out


def _kl_of(ev: Evaluator, stage: dict[str, Any]) -> float:
    model, _ = ev.compress({"stages": [stage]})
    return float(ev.measure(model, ev.select_windows[: max(4, len(ev.select_windows) // 4)])["kl"])


def _embed_kl(ev: Evaluator, bits: int, group_size: int) -> float:
    """Embeddings only (a head tied to them is rounded with them)."""
    from lmpress.quant.base import quantize_embeddings
    from lmpress.quant.rtn import RTNConfig

    model = copy.deepcopy(ev.model)
    config = RTNConfig.model_validate({"bits": bits, "embedding_bits": bits, "embedding_group_size": group_size})
    quantize_embeddings(model, config)
    return float(ev.measure(model, ev.select_windows[: max(4, len(ev.select_windows) // 4)])["kl"])


def _space_key(space: SearchSpace, groups: list[list[int]]) -> str:
    """What the sensitivity cache depends on, as a short hash."""
    import hashlib

    parts = [groups, space.bits, space.head_bits, space.embedding_bits, space.group_sizes, space.sparsity]
    blob = json.dumps([*parts, space.drop_blocks], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def predicted_kl(choice: dict[str, Any], sens: dict[str, float], n_groups: int) -> float:
    """A trial's KL predicted as the sum of its parts' (first order: the parts' errors add)."""
    kl = sum(sens.get(f"g{g}@{choice[f'bits_g{g}']}", 0.0) for g in range(n_groups))
    kl += sum(sens.get(f"g{g}@s{choice.get(f'sparsity_g{g}', 0.0):g}", 0.0) for g in range(n_groups))
    kl += sens.get(f"drop@{choice.get('drop_blocks', 0)}", 0.0)
    if choice.get("head_bits"):
        kl += sens.get(f"head@{choice['head_bits']}", 0.0)
    if choice.get("embedding_bits"):
        kl += sens.get(f"embed@{choice['embedding_bits']}", 0.0)
    return kl


# ---- the study ----------------------------------------------------------------------------------


class SearchConfig(BaseModel):
    """How to search: the space, the budget, the objective, the trial budget and where the study lives."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    space: SearchSpace = Field(default_factory=lambda: SearchSpace.model_validate({}))
    budget: Budget = Field(default_factory=lambda: Budget.model_validate({}))
    # what the best trial minimizes (speedup: maximizes); None: bytes when the only budget is
    # max_ppl_increase (the smallest model within it), else perplexity
    objective: Literal["perplexity", "kl", "bytes", "speedup"] | None = None
    multi_objective: bool = False  # NSGA-II over (objective, bytes): the Pareto front
    trials: int = Field(30, ge=1)  # trials in the study in all (a resumed study counts its earlier ones)
    timeout: float | None = Field(None, gt=0)  # seconds for this process
    calib_windows: int = Field(64, ge=1)
    select_windows: int = Field(32, ge=4)
    seed: int = 0
    prune: bool = True  # size proxy and sensitivity prediction before the calibrated work
    seeds: bool = True  # start from uniform and sensitivity-guided recipes
    recovery: Recovery = Field(default_factory=lambda: Recovery.model_validate({}))
    study_name: str = "lmpress-search"
    storage: str | None = None  # Optuna storage URL; None: SQLite in the study directory
    heartbeat: float = Field(15.0, gt=0)  # seconds between a running trial's heartbeats
    grace: float = Field(45.0, gt=0)  # a trial without a heartbeat this long had its worker killed: failed, retried


@dataclass
class SearchResult:
    best: dict[str, Any] | None  # the best feasible trial: recipe, bytes, perplexity, kl, ...
    pareto: list[dict[str, Any]]  # feasible, non-dominated trials on (objective, bytes)
    trials: list[dict[str, Any]]
    original: dict[str, float]
    smallest_bytes: int
    seconds: float
    sensitivity: dict[str, float]


def _suggest(trial: Any, space: SearchSpace, n_groups: int) -> dict[str, Any]:
    choice: dict[str, Any] = {"method": trial.suggest_categorical("method", space.methods)}
    for g in range(n_groups):
        choice[f"bits_g{g}"] = trial.suggest_categorical(f"bits_g{g}", space.bits)
    choice["group_size"] = trial.suggest_categorical("group_size", space.group_sizes)
    choice["head_bits"] = trial.suggest_categorical("head_bits", space.head_bits)
    choice["embedding_bits"] = trial.suggest_categorical("embedding_bits", space.embedding_bits)
    for g in range(n_groups):
        choice[f"sparsity_g{g}"] = trial.suggest_categorical(f"sparsity_g{g}", space.sparsity)
    choice["drop_blocks"] = trial.suggest_categorical("drop_blocks", space.drop_blocks)
    return choice


def _seed_choices(space: SearchSpace, n_groups: int, sens: dict[str, float], small: bool) -> list[dict[str, Any]]:
    """Uniform bits at every level, and the same with one step more bits for the most sensitive group;
    with a size budget (``small``), head and embeddings at their fewest bits."""
    out = []
    levels = sorted(space.bits)

    def pick(options: list[int | None]) -> int | None:
        quantized = [b for b in options if b]
        return min(quantized) if small and quantized else options[0]

    common = {
        "method": space.methods[0],
        "group_size": min(space.group_sizes),
        "head_bits": pick(space.head_bits),
        "embedding_bits": pick(space.embedding_bits),
        **{f"sparsity_g{g}": space.sparsity[0] for g in range(n_groups)},
        "drop_blocks": space.drop_blocks[0],
    }

    def above(options: list[int | None], b: int) -> int | None:
        higher = sorted(x for x in options if x and x > b)
        return higher[0] if higher else None

    for i, b in enumerate(levels):
        uniform = {**common, **{f"bits_g{g}": b for g in range(n_groups)}}
        out.append(uniform)
        if i + 1 < len(levels) and n_groups > 1 and sens:
            worst = max(range(n_groups), key=lambda g: sens.get(f"g{g}@{b}", 0.0))
            out.append({**uniform, f"bits_g{worst}": levels[i + 1]})
        if small:  # the usual hand-written choice: head and embeddings one step above the blocks
            head, embed = above(space.head_bits, b), above(space.embedding_bits, b)
            if head is not None and embed is not None:
                out.append({**uniform, "head_bits": head, "embedding_bits": embed})
    return out


def run_search(
    model: nn.Module,
    tokenizer: Any,
    calib: Any,
    config: SearchConfig,
    study_dir: Path,
    progress: bool = False,
    train: Any = None,
) -> SearchResult:
    """Run (or resume) the study; ``calib`` is calibration-split TokenData with at least
    ``calib_windows + select_windows`` windows; ``train`` (train-split TokenData) feeds recovery."""
    import dataclasses

    import optuna

    t0 = time.perf_counter()
    budget, space = config.budget, config.space
    if (
        not config.multi_objective
        and budget.max_bytes is None
        and budget.max_ppl_increase is None
        and budget.min_speedup is None
    ):
        raise SearchError(
            "search: give a budget (--max-bytes, --max-ppl-increase or --min-speedup) or --multi-objective"
        )
    need = config.calib_windows + config.select_windows
    if calib.windows.shape[0] < need:
        raise SearchError(
            f"search: {calib.windows.shape[0]} calibration-split windows, need {need} "
            f"({config.calib_windows} to calibrate + {config.select_windows} to select on); "
            "give more text or fewer windows"
        )
    if config.recovery.steps and train is None:
        raise SearchError("search: recovery training needs the train split; give train data or set recovery steps to 0")
    model.eval()
    adapter = Adapter(model)
    groups = block_groups(adapter.num_blocks, space.block_groups)
    if max(space.drop_blocks) >= adapter.num_blocks:
        raise SearchError(f"search: drop_blocks {max(space.drop_blocks)} leaves no block of {adapter.num_blocks}")
    prefix = adapter.spec.blocks
    calibration = dataclasses.replace(calib, windows=calib.windows[: config.calib_windows])
    select = calib.windows[config.calib_windows : need]
    ev = Evaluator(model, tokenizer, calibration, select, 0.0, train)
    ev.base_ppl = quality(model, select, batch_size=16)["perplexity"]
    original = {"bytes": float(tensor_bytes(model)), "perplexity": ev.base_ppl}

    smallest_choice = {
        "method": "rtn",
        **{f"bits_g{g}": min(space.bits) for g in range(len(groups))},
        "group_size": max(space.group_sizes),
        "head_bits": min((b for b in space.head_bits if b), default=None),
        "embedding_bits": min((b for b in space.embedding_bits if b), default=None),
        **{f"sparsity_g{g}": max(space.sparsity) for g in range(len(groups))},
        "drop_blocks": max(space.drop_blocks),
    }
    _, smallest = ev.compress(as_rtn(build_recipe(smallest_choice, prefix, groups, "smallest")))
    if max(space.sparsity) > 0:  # a sparse layer keeps a mask: at few bits, dense may be the smaller
        dense_choice = {**smallest_choice, **{f"sparsity_g{g}": 0.0 for g in range(len(groups))}}
        _, dense_bytes = ev.compress(as_rtn(build_recipe(dense_choice, prefix, groups, "smallest")))
        if dense_bytes < smallest:
            smallest_choice, smallest = dense_choice, dense_bytes
    if budget.max_bytes is not None and budget.max_bytes < smallest:
        raise SearchError(
            f"search: no recipe in the space fits {budget.max_bytes / 1e6:.2f} MB; the smallest reachable is "
            f"{smallest / 1e6:.2f} MB (every choice at its smallest: {min(space.bits)}-bit blocks, head and embeddings "
            "at their fewest bits); raise --max-bytes or widen the space"
        )
    study_dir.mkdir(parents=True, exist_ok=True)  # only once the budget is known to be reachable
    with _locked(study_dir / ".lock"):  # workers starting together: one measures and creates, the others read
        sens_key = f"sensitivity-{_space_key(space, groups)}.json"
        sens = sensitivity(ev, space, groups, prefix, study_dir / sens_key) if (config.prune or config.seeds) else {}
        study = _open_study(config, study_dir)
    if config.seeds and not study.trials:
        seeds = _seed_choices(space, len(groups), sens, budget.max_bytes is not None)
        if budget.max_bytes is not None:  # the smallest recipe: feasible whenever anything is
            seeds.insert(0, {**smallest_choice, "method": space.methods[0]})
        for choice in seeds:
            study.enqueue_trial(choice, skip_if_exists=True)
    only_quality = budget.max_bytes is None and budget.min_speedup is None and budget.max_ppl_increase is not None
    goal = config.objective or ("bytes" if only_quality and not config.multi_objective else "perplexity")
    if config.multi_objective and goal == "bytes":
        goal = "perplexity"  # bytes is the second objective already
    timed_speed = budget.min_speedup is not None or goal == "speedup"

    def objective(trial: Any) -> float | tuple[float, float] | list[float]:
        choice = _suggest(trial, space, len(groups))
        for other in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.params == trial.params:  # TPE proposed a recipe already measured: reuse it
                for k, v in other.user_attrs.items():
                    trial.set_user_attr(k, v)
                trial.set_user_attr("repeat_of", other.number)
                _constrain(trial, list(other.user_attrs.get("constraints", [0.0])))
                return list(other.values) if config.multi_objective else float(other.value)
        recipe = build_recipe(choice, prefix, groups, f"search-{trial.number}")
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("worker", os.getpid())
        t = time.perf_counter()
        # the stages the proxy shares with the trial (dropping, SparseGPT) run once, for both
        stages, fast = recipe["stages"], as_rtn(recipe)["stages"]
        shared = next((i for i, (a, b) in enumerate(zip(stages, fast, strict=True)) if a != b), len(stages))
        common = ev.compress({"stages": stages[:shared]})[0] if shared else None
        # same formats, same bytes, seconds not minutes
        proxy, nbytes = ev.compress({"stages": fast[shared:]}, start=common)
        trial.set_user_attr("bytes", nbytes)
        pred = predicted_kl(choice, sens, len(groups)) if sens else None
        trial.set_user_attr("predicted_kl", pred)
        if config.prune and budget.max_bytes is not None and nbytes > budget.max_bytes:
            trial.set_user_attr("pruned_by", "size")
            raise optuna.TrialPruned()
        limit = budget.max_ppl_increase
        hopeless = pred is not None and limit is not None and math.exp(pred) - 1 > 4 * limit
        if config.prune and hopeless:
            trial.set_user_attr("pruned_by", "sensitivity")
            raise optuna.TrialPruned()
        exact = shared == len(stages)  # the proxy is the trial itself
        compressed = proxy if exact else ev.compress({"stages": stages[shared:]}, start=common)[0]
        speedup = _speedup(model, compressed, budget.speed) if timed_speed else None
        attrs = _scored(ev, compressed, nbytes, budget, speedup)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        _constrain(trial, attrs["constraints"])
        trial.set_user_attr("seconds", time.perf_counter() - t)
        return _values(attrs)

    def _values(attrs: dict[str, Any]) -> float | tuple[float, float]:
        value = _goal_value(attrs, goal)
        return (value, float(attrs["bytes"])) if config.multi_objective else value

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)  # what uses up the trial budget
    done = len(study.get_trials(deepcopy=False, states=counted))  # a crashed trial is retried, not counted
    remaining = config.trials - done
    if remaining > 0:  # other workers may add trials meanwhile: stop when the study holds `trials`
        from optuna.study import MaxTrialsCallback

        stop = MaxTrialsCallback(config.trials, states=counted)  # enqueued seeds do not count until run
        quiet = logging.getLogger("lmpress.pipeline")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # one line per stage per trial would drown the progress bar
        try:
            study.optimize(
                objective, n_trials=remaining, timeout=config.timeout, show_progress_bar=progress, callbacks=[stop]
            )
        finally:
            quiet.setLevel(level)
    if config.recovery.steps:
        _recover(study, ev, config, study_dir, goal, _values)
    trials = [_trial_record(t) for t in study.trials if t.state.is_finished()]
    feasible = [t for t in trials if t["state"] == "COMPLETE" and all(c <= 0 for c in t.get("constraints", [0]))]
    best = min(feasible, key=lambda t: (_goal_value(t, goal), t["bytes"])) if feasible else None
    from lmpress.report import pareto

    front = pareto([(float(t["bytes"]), _goal_value(t, goal)) for t in feasible])
    result = SearchResult(
        best=best,
        pareto=[feasible[i] for i in front],
        trials=trials,
        original=original,
        smallest_bytes=int(smallest),
        seconds=time.perf_counter() - t0,
        sensitivity=sens,
    )
    write_json_atomic(study_dir / "trials.json", {"original": original, "best": best, "trials": trials})
    return result


def _goal_value(attrs: dict[str, Any], goal: str) -> float:
    """What the search minimizes for a measured trial (speedup is maximized)."""
    return -float(attrs["speedup"]) if goal == "speedup" else float(attrs[goal])


def _scored(ev: Evaluator, compressed: nn.Module, nbytes: int, budget: Budget, speedup: float | None) -> dict[str, Any]:
    """A compressed model's selection metrics and how far outside each budget it is (<= 0: within)."""
    m = ev.measure(compressed)
    ppl_inc = m["perplexity"] / ev.base_ppl - 1
    cons = [
        nbytes - budget.max_bytes if budget.max_bytes is not None else 0.0,
        ppl_inc - budget.max_ppl_increase if budget.max_ppl_increase is not None else 0.0,
    ]
    out: dict[str, Any] = {"bytes": nbytes, "perplexity": m["perplexity"], "kl": m["kl"], "ppl_increase": ppl_inc}
    if speedup is not None:
        out["speedup"] = speedup
        cons.append(budget.min_speedup - speedup if budget.min_speedup is not None else 0.0)
    out["constraints"] = cons
    return out


def _recover(study: Any, ev: Evaluator, config: SearchConfig, study_dir: Path, goal: str, values: Any) -> None:
    """Distill the best ``top_k`` post-training candidates against the original; each result joins the
    study as a trial of its own (its params: the candidate's plus ``recovery_steps``).

    Candidates are the measured trials within every budget that training cannot change (size, speed),
    best objective first. When the objective is one training cannot change (bytes, speedup), they are
    the trials better on it than the best feasible one but outside the quality budget, closest to it
    first: training may bring them within it. A candidate is claimed in
    the study before it is trained, so workers sharing the study refine different candidates."""
    import optuna

    rec = config.recovery
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    measured = [
        t
        for t in trials
        if "perplexity" in t.user_attrs and "repeat_of" not in t.user_attrs and "refines" not in t.user_attrs
    ]

    def fixed_budgets_met(t: Any) -> bool:  # everything but the quality budget, which training improves
        cons = t.user_attrs.get("constraints", [0.0])
        quality = CONSTRAINTS.index("ppl_increase_over")
        return all(c <= 0 for i, c in enumerate(cons) if i != quality)

    if goal in ("bytes", "speedup"):
        feasible = [
            t for t in trials if "perplexity" in t.user_attrs and all(c <= 0 for c in t.user_attrs["constraints"])
        ]
        bar = min((_goal_value(t.user_attrs, goal) for t in feasible), default=math.inf)
        pool = sorted(
            (t for t in measured if fixed_budgets_met(t) and _goal_value(t.user_attrs, goal) < bar),
            key=lambda t: t.user_attrs["ppl_increase"],
        )
    else:
        pool = sorted((t for t in measured if fixed_budgets_met(t)), key=lambda t: _goal_value(t.user_attrs, goal))
    distribution = optuna.distributions.CategoricalDistribution([0, rec.steps])
    for cand in pool[: rec.top_k]:
        claim = f"recovery:{cand.number}:{rec.steps}"
        with _locked(study_dir / ".lock"):
            if claim in study.user_attrs:
                continue  # another worker (or an earlier run of this study) has it
            study.set_user_attr(claim, os.getpid())
        t = time.perf_counter()
        recipe = copy.deepcopy(cand.user_attrs["recipe"])
        recipe["name"] = f"{recipe['name']}-recovered"
        recipe["stages"].append(rec.stage())
        model, nbytes = ev.compress(recipe)
        attrs = _scored(ev, model, nbytes, config.budget, cand.user_attrs.get("speedup"))
        attrs.update(recipe=recipe, refines=cand.number, worker=os.getpid(), seconds=time.perf_counter() - t)
        value = values(attrs)
        study.add_trial(
            optuna.trial.create_trial(
                params={**cand.params, "recovery_steps": rec.steps},
                distributions={**cand.distributions, "recovery_steps": distribution},
                **({"values": list(value)} if config.multi_objective else {"value": value}),
                user_attrs=attrs,
                # the key Trial.set_constraint writes: the samplers see the constraints of this trial too
                system_attrs={
                    f"constraints:{k}": float(v) for k, v in zip(CONSTRAINTS, attrs["constraints"], strict=False)
                },
            )
        )
        log.info(
            "recovery of trial %d: perplexity %.3f -> %.3f",
            cand.number,
            cand.user_attrs["perplexity"],
            attrs["perplexity"],
        )


CONSTRAINTS = ("bytes_over", "ppl_increase_over", "speedup_short")


def _constrain(trial: Any, values: list[float]) -> None:
    """Tell the sampler how far outside each budget the trial is (<= 0: within)."""
    for key, value in zip(CONSTRAINTS, values, strict=False):
        trial.set_constraint(key, float(value))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes (POSIX ``flock``)."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _open_study(config: SearchConfig, study_dir: Path) -> Any:
    """Create or load the study in its storage."""
    import optuna

    storage = config.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    sampler = (  # constraints come from trial.set_constraint: the samplers learn the feasible region
        optuna.samplers.NSGAIISampler(seed=config.seed)
        if config.multi_objective
        else optuna.samplers.TPESampler(seed=config.seed, multivariate=True)
    )
    directions: list[Literal["minimize", "maximize"]] = ["minimize"] * (2 if config.multi_objective else 1)
    # heartbeats: a trial whose worker was killed is failed after the grace period, not left running forever
    import warnings

    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = (
            optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=max(1, round(config.heartbeat)),
                grace_period=max(1, round(config.grace)),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
            if "://" in storage
            else storage
        )
    return optuna.create_study(
        study_name=config.study_name, storage=rdb, sampler=sampler, directions=directions, load_if_exists=True
    )


def _trial_record(t: Any) -> dict[str, Any]:
    rec = {"number": t.number, "state": t.state.name, "params": t.params, **t.user_attrs}
    rec["duration"] = t.duration.total_seconds() if t.duration else t.user_attrs.get("seconds")
    return rec


def _speedup(base: nn.Module, model: nn.Module, kind: str) -> float:
    """Tokens/s of ``model`` over the original's, decode (batch 1, KV cache) or prefill; both timed here,
    one after the other, so that the ratio holds on a noisy machine."""
    from lmpress.evaluation import speed

    key = "decode_tokens_per_s" if kind == "decode" else "prefill_tokens_per_s"
    vocab = int(base.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    a = speed(base, vocab, prompt_len=64, decode_tokens=32, repeats=2)[key]
    b = speed(model, vocab, prompt_len=64, decode_tokens=32, repeats=2)[key]
    return b / a


def study_runs(result: SearchResult) -> list[dict[str, Any]]:
    """Every measured trial as a run record for `lmpress.report` (the best one labelled ``best``)."""
    original = {"perplexity": result.original["perplexity"], "bytes": result.original["bytes"]}
    best = result.best["number"] if result.best else None
    runs = []
    for t in result.trials:
        if t["state"] != "COMPLETE" or "repeat_of" in t or "perplexity" not in t:
            continue
        label = f"best #{t['number']}" if t["number"] == best else f"#{t['number']}"
        if "refines" in t:
            label += f" (#{t['refines']} + recovery)"
        metrics = {"perplexity": t["perplexity"], "kl": t["kl"], "bytes": t["bytes"]}
        runs.append(
            {"name": label, "recipe": {"name": label}, "metrics": {"original": original, "compressed": metrics}}
        )
    return runs


def record_study(
    tracking: Any, result: SearchResult, source: str, study_dir: Path, evaluation: dict[str, Any] | None = None
) -> Path | None:
    """The study as a run of its own (``search``): its run directory holds ``trials.json``, the study
    report and the best recipe; MLflow gets the best trial's recipe and metrics, the study's counts, and
    every measured trial's perplexity and bytes as a series over trial numbers."""
    import shutil

    import yaml

    from lmpress.track import new_run_dir, record_run

    if not tracking.enabled or result.best is None:
        return None
    run_dir = new_run_dir(tracking, "search", study_dir.name)
    for name in ("trials.json", "report.html", "best.yaml"):
        if (study_dir / name).is_file():
            shutil.copy2(study_dir / name, run_dir / name)
    measured = sorted(
        (t for t in result.trials if t["state"] == "COMPLETE" and "perplexity" in t and "repeat_of" not in t),
        key=lambda t: t["number"],
    )
    best = result.best
    selection = {k: best[k] for k in ("perplexity", "kl", "bytes", "ppl_increase", "speedup") if k in best}
    record = {
        "source_model": source,
        "recipe": best["recipe"],
        "metrics": {
            "original": (evaluation or {}).get("original") or {},
            "compressed": (evaluation or {}).get("compressed") or {},
            "selection": selection,
            "study": {
                "trials": float(len(result.trials)),
                "measured": float(len(measured)),
                "pruned": float(sum(t["state"] == "PRUNED" for t in result.trials)),
                "recovered": float(sum("refines" in t for t in result.trials)),
                "seconds": result.seconds,
                "best_trial": float(best["number"]),
            },
        },
        "search": {
            "study_dir": str(study_dir),
            "best_trial": best["number"],
            "pareto": [t["number"] for t in result.pareto],
            "smallest_bytes": result.smallest_bytes,
        },
        "series": {
            "trial.perplexity": [(t["number"], float(t["perplexity"])) for t in measured],
            "trial.bytes": [(t["number"], float(t["bytes"])) for t in measured],
        },
    }
    return record_run(
        tracking, "search", study_dir.name, record, run_dir, yaml.safe_dump(best["recipe"], sort_keys=False)
    )
