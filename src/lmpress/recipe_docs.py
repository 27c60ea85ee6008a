"""The recipe reference (``docs/recipes.md``), generated from the method configs so it never drifts.

Every method's keys come from its pydantic config: type, default, bounds, and the comment written
beside the field in the source. Regenerate with ``python -m lmpress.recipe_docs > docs/recipes.md``;
a test fails when the committed file is stale.
"""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

from pydantic import BaseModel

from lmpress.method import MethodConfig
from lmpress.recipe import load_recipe, presets
from lmpress.registry import methods

# keys many methods share, described once (a comment beside the field in the source wins)
COMMON = {
    "calib_batch_size": "calibration windows per forward pass (memory vs speed)",
    "targets": "layers this stage changes: exact names or `re:` regexes",
    "ignore": "layers to leave alone (wins over targets)",
    "symmetric": "zero point fixed at the grid's middle (no stored zeros)",
    "group_size": "weights sharing one scale; null: one group per output row",
    "bits": "bits per stored weight code",
    "seed": "random seed (batches, initialisation): a run is reproducible",
    "weight_decay": "AdamW weight decay",
    "temperature": "softmax temperature of the distillation loss (T² scaling)",
    "lr": "peak learning rate (after warm-up, before cosine decay)",
    "kl_weight": "weight of KL(teacher ‖ student) on the logits",
    "hidden_weight": "weight of the hidden-state matching loss",
    "ce_weight": "weight of cross-entropy on the next token",
    "grad_clip": "gradient norm clipping",
    "eval_every": "steps between held-out evaluations (early stopping, best keeping)",
    "damp": "added to the Hessian's diagonal, as a share of its mean (raised x10 up to 1 where it does not factor)",
    "mse_clip": "search the clipping range that minimizes the rounding error",
    "act_order": "quantize columns in order of decreasing Hessian diagonal",
    "text_field": "JSONL field holding the text",
    "dtype": "the floating-point type",
}
FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """``name: type = default  # comment`` -> {name: comment}, through the class's bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, BaseModel) or not issubclass(klass, BaseModel):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []  # comment lines right above a field describe it when it has none of its own
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# ").strip())
                continue
            m = FIELD_LINE.match(line)
            if m and (m.group(2) or above) and not stripped.startswith(("def ", "class ", "return")):
                out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
            above = []
    return out


def type_name(annotation: Any) -> str:
    """A readable type: ``Literal['a', 'b']`` -> ``a | b``, ``list[Override]`` stays."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return f"list of {type_name(inner)}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def bounds(info: Any) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def default_of(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    return f"`{value!r}`".replace("None", "null").replace("True", "true").replace("False", "false")


def model_table(cls: type[BaseModel], skip: tuple[str, ...] = ("method",)) -> list[str]:
    comments = field_comments(cls)
    rows = ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        meaning = comments.get(name, COMMON.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(info.annotation)} | {default_of(info)} | {bounds(info)} | {meaning} |")
    return rows


def nested_models(cls: type[BaseModel]) -> list[type[BaseModel]]:
    """Sub-models used in a config's fields (overrides, sharing groups)."""
    found: list[type[BaseModel]] = []

    def visit(t: Any) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel) and not issubclass(t, MethodConfig) and t not in found:
            found.append(t)
        for arg in typing.get_args(t):
            visit(arg)

    for info in cls.model_fields.values():
        visit(info.annotation)
    return found


def render() -> str:
    lines = [
        "# Recipe reference",
        "",
        "<!-- generated by `python -m lmpress.recipe_docs > docs/recipes.md`; do not edit: a test checks it -->",
        "",
        "A recipe is YAML: an optional `name` and `description`, and `stages`, a list of methods applied in",
        "order. Each stage names its `method`; the other keys are the method's, below. Unknown keys, wrong",
        "types and out-of-range values are errors before any work starts.",
        "",
        "```yaml",
        "name: my-recipe",
        "stages:",
        "  - method: sparsegpt",
        "    sparsity: 0.5",
        "  - method: gptq",
        "    bits: 4",
        "```",
        "",
        "## Presets",
        "",
        "| preset | what it is | stages |",
        "|---|---|---|",
    ]
    for name in presets():
        recipe = load_recipe(name)
        stages = " → ".join(s.method for s in recipe.stages)
        lines.append(f"| `{name}` | {recipe.description} | {stages} |")
    lines += ["", "## Methods", ""]
    registry = methods()
    for name in sorted(registry):
        m = registry[name]
        lines += [
            f"### `{name}`",
            "",
            m.summary + ("; trains against the original" if m.needs_teacher else "") + ".",
            "",
        ]
        doc = inspect.getdoc(m.config)
        if doc:
            lines += [doc, ""]
        lines += model_table(m.config)
        for sub in nested_models(m.config):
            lines += ["", f"Each entry of type `{sub.__name__}`: {inspect.getdoc(sub) or ''}", ""]
            lines += model_table(sub, skip=())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
