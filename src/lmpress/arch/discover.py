"""A decoder lmpress has no spec for, read from its structure: the generic `Spec`.

The decoder blocks are the ``nn.ModuleList`` the base model runs in sequence: of the module lists
whose children share one class and hold linear layers, the outermost (an MoE block's list of
experts is inside a block), preferring the one beside the input embeddings (a multimodal model's
vision tower has its own), then the longest. A block's linears are its ``nn.Linear`` and GPT-2-style
``Conv1D`` modules (or the compressed layers that replaced them), by position; their role is
unknown (`GENERIC_ROLE`), and so are the norms, the scale groups and the runtimes' names. The one
module outside the blocks, the embeddings and the head that holds tensors, where there is exactly
one and it is registered beside the blocks and after them, is taken as the final norm (what runs
between the last block and the head), so that a streamed model can run its head; its kind is
unknown. Without one, or when the config scales or caps the logits after the head (`LOGIT_KEYS`),
the model is compressed whole.

What needs no roles (round-to-nearest, GPTQ, HQQ, unstructured pruning, low-rank, clustering,
dropping blocks, casting) works on this; what does needs a spec, and says so
(`Adapter.require_roles`). Blocks without any attention (a state-space model) are refused
(`lmpress.arch.kinds`).
"""

from __future__ import annotations

import inspect

from torch import nn

from lmpress.arch.kinds import has_attention, no_attention
from lmpress.arch.registry import unknown_architecture
from lmpress.arch.spec import Norm, Spec

GENERIC_ROLE = "linear"  # a linear found by position: what it computes is not known
# config keys with which some families change the logits after the head (scale, soft-cap)
LOGIT_KEYS = (
    "logit_scale",
    "logits_scaling",
    "final_logit_softcapping",
    "lm_head_multiplier",
    "output_multiplier_scale",
)
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")  # a mixture's width
LOOKED_FOR = "decoder blocks (an nn.ModuleList of one block class holding linear layers)"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_linear(module: nn.Module) -> bool:
    """A linear layer: ``nn.Linear``, ``Conv1D``, or a compressed layer standing in for one (it has
    a storage ``FORMAT`` and in/out widths)."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return hasattr(type(module), "FORMAT") and hasattr(module, "in_features") and hasattr(module, "out_features")


def discover(model: nn.Module) -> Spec:
    """The generic spec of ``model`` (also on the meta device), or the one-line error saying what
    was looked for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = {id(m): n for n, m in model.named_modules()}
    embed_name = names.get(id(_called(model, "get_input_embeddings")))
    blocks = find_blocks(model, embed_name)
    if blocks is None or embed_name is None:
        what = LOOKED_FOR if blocks is None else "input embeddings (get_input_embeddings())"
        raise unknown_architecture(model_type, f"lmpress has no spec for it and found no {what} in it")
    if not has_attention(model.get_submodule(blocks)):
        raise no_attention(model_type)
    head_name = names.get(id(_called(model, "get_output_embeddings")))
    embeddings = {embed_name: "token_embd"}
    for name, m in model.named_modules():  # learned positions and the like: needed before block 0
        if isinstance(m, nn.Embedding) and name not in (embed_name, head_name) and not _under(name, blocks):
            embeddings[name] = "embedding"
    rest = outside_units(model, blocks, [*embeddings, head_name or ""])
    return Spec(
        model_types=(str(model_type),),
        blocks=blocks,
        embeddings=embeddings,
        final_norm=Norm(rest[0], "output_norm", "unknown") if _after(model, blocks, rest) else None,
        linears=dict.fromkeys(_replaceable(model, blocks), GENERIC_ROLE),
        norms=(),
        generic=True,
    )


def _replaceable(model: nn.Module, blocks: str) -> list[str]:
    """`block_linears` less a mixture's routers, kept in float as a spec's are: a linear whose width
    is the config's expert count, or an ``nn.Linear`` subclass with a forward of its own (Phi-MoE's
    and Llama 4's routers return the routing, which a compressed layer would drop); and a linear
    whose ``weight`` its parent's forward reads (a compressed layer has none)."""
    config = getattr(model, "config", None)
    counts = {getattr(config, k, None) for k in EXPERT_KEYS}
    counts = {n for c in counts for n in (c if isinstance(c, list) else [c]) if isinstance(n, int) and n > 0}
    out = []
    for path in block_linears(model.get_submodule(blocks)):
        block = next(b for b in model.get_submodule(blocks).children() if _has(b, path))
        m = block.get_submodule(path)
        own_forward = isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
        parent, _, leaf = path.rpartition(".")
        read = f"self.{leaf}.weight" in _source(type(block.get_submodule(parent)).forward)
        if not own_forward and not read and getattr(m, "out_features", None) not in counts:
            out.append(path)
    return out


def _source(fn: object) -> str:
    try:
        return inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _called(model: nn.Module, method: str) -> nn.Module | None:
    """``model.method()`` where the model has it (a plain module does not)."""
    fn = getattr(model, method, None)
    try:
        out = fn() if callable(fn) else None
    except NotImplementedError:
        return None
    return out if isinstance(out, nn.Module) else None


def _after(model: nn.Module, blocks: str, rest: list[str]) -> bool:
    """``rest`` is one module, registered beside the blocks and after them (as a final norm is; an
    embedding norm, registered before, runs before block 0)."""
    if len(rest) != 1 or not _plain_logits(getattr(model, "config", None)):
        return False
    base, _, name = blocks.rpartition(".")
    parent, _, unit = rest[0].rpartition(".")
    order = [n for n, _ in (model.get_submodule(base) if base else model).named_children()]
    return parent == base and unit in order and order.index(unit) > order.index(name)


def _plain_logits(config: object) -> bool:
    """The logits are the head's output (no scale or soft-cap after it, which a streamed model, whose
    logits are head(final norm(h)), would miss)."""
    return all(getattr(config, k, None) in (None, 1, 1.0) for k in LOGIT_KEYS)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_blocks(model: nn.Module, embed_name: str | None = None) -> str | None:
    """The path of the decoder blocks' ``ModuleList``, or None (see the module's docstring)."""
    found = {
        name: len(m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(c) for c in m}) == 1
        and any(is_linear(x) for x in m[0].modules())
    }
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    if not outer:
        return None
    beside = embed_name.rpartition(".")[0] if embed_name else None
    return max(outer, key=lambda n: (n.rpartition(".")[0] == beside, found[n]))


def block_linears(blocks: nn.Module) -> list[str]:
    """Block-relative paths of the linears of every block, in order of first appearance (a block
    that lacks one of them, as in a hybrid model, is allowed)."""
    out: dict[str, None] = {}
    for block in blocks.children():
        for name, m in block.named_modules():
            if name and is_linear(m):
                out.setdefault(name)
    return list(out)


def outside_units(model: nn.Module, blocks: str, skip: list[str]) -> list[str]:
    """The modules holding saved tensors outside the blocks and ``skip`` (embeddings, head), each
    as the child of the blocks' parent that holds it (or the module itself when it is elsewhere)."""
    base = blocks.rpartition(".")[0]
    units: dict[str, None] = {}
    keys = [n for n, _ in model.named_parameters()]
    for mname, m in model.named_modules():
        keys += [
            f"{mname}.{b}".lstrip(".")
            for b, t in m._buffers.items()
            if t is not None and b not in m._non_persistent_buffers_set
        ]
    for key in keys:
        owner = key.rpartition(".")[0]
        if _under(owner, blocks) or any(s and _under(owner, s) for s in skip):
            continue
        if base and owner.startswith(base + "."):
            owner = f"{base}.{owner[len(base) + 1 :].split('.', 1)[0]}"
        units.setdefault(owner)
    return list(units)
