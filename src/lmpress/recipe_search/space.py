"""The search space and the budget: what a trial may choose, and the recipe a choice becomes."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmpress.errors import LmpressError

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
