"""The parts of one loaded model, found through its family's `Spec`.

Methods, exporters and streaming ask an `Adapter` for "the blocks", "the attention projections of
block i", "the norm in front of these linears and its kind" or "the module whose role is attn_v",
and never spell a path themselves. GPT-2's transposed ``Conv1D`` is handled here too
(`linear_weight`). A model whose family has no spec gets the one `lmpress.arch.discover` reads
from its structure (blocks and linears, no roles); what needs roles refuses it
(`Adapter.require_roles`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from lmpress.arch.discover import discover, is_conv1d, is_linear
from lmpress.arch.multimodal import language_model_spec, text_model_type
from lmpress.arch.registry import is_supported, spec_for
from lmpress.arch.spec import NormKind, Spec
from lmpress.errors import LmpressError, ModelLoadError


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear-like module as (out, in), a view for ``Conv1D``."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w.T if is_conv1d(module) else w


def roles_refusal(model_type: str, roles: tuple[str, str, str]) -> str:
    """The one line that refuses a step needing roles for a family without a spec: ``roles`` is
    (what, what it needs lmpress to know, what to do instead)."""
    what, needs, instead = roles
    return (
        f"{what} needs lmpress to know the {model_type} family's {needs} (no spec in "
        f"lmpress/arch/families); {instead}, or add a spec"
    )


class Adapter:
    """Finds the parts of one loaded model: blocks, projections, embeddings, head and norms."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.model = model
        self.model_type: str = str(model_type)
        self.spec = spec_for(model_type) if is_supported(model_type) else _unlisted(model)
        # a multimodal model's language model: what lmpress compresses, beside what it keeps as is
        multimodal = text_model_type(getattr(model, "config", None)) is not None
        self.language_model = self.spec.blocks.rpartition(".")[0] if multimodal else None
        if self.spec.generic:
            return
        assert self.spec.final_norm is not None
        for path in (self.spec.blocks, self.spec.final_norm.path, *self.spec.embeddings):
            self._get(path)
        for name in (*self.spec.attention, *self.spec.mlp):
            if name not in self.spec.optional_linears:
                self._get(f"{self.spec.blocks}.0.{name}")
            elif self.spec.experts is None and not any(
                self._has(f"{self.block_name(i)}.{name}") for i in range(self.num_blocks)
            ):
                self._get(f"{self.spec.blocks}.0.{name}")  # no block has it: the layout differs

    def require_roles(self, what: str, needs: str, instead: str, error: type[LmpressError] = LmpressError) -> None:
        """Refuse ``what`` for a model without a spec, in one line: what it ``needs`` lmpress to
        know and what to do ``instead``; nothing for a model whose family has a spec."""
        if self.spec.generic:
            raise error(roles_refusal(self.model_type, (what, needs, instead)))

    def is_text(self, name: str) -> bool:
        """The module ``name`` belongs to the text model: any module of a text-only model; in a
        multimodal one, the language model and the head, not the vision tower or the projector."""
        if self.language_model is None:
            return True
        return any(name == p or name.startswith(p + ".") for p in (self.language_model, self.head()[0]))

    def _get(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            raise ModelLoadError(
                f"{self.model_type} model has no module {path!r}; its layout differs from what lmpress expects"
            ) from None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def blocks(self) -> nn.ModuleList:
        blocks = self._get(self.spec.blocks)
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    def block_name(self, i: int) -> str:
        return f"{self.spec.blocks}.{i}"

    def _block_modules(self, i: int, names: tuple[str, ...]) -> dict[str, nn.Module]:
        out = {}
        for n in names:
            name = f"{self.block_name(i)}.{n}"
            if self._absent(n, name):  # a hybrid model's blocks differ
                continue
            out[name] = self._get(name)
        return out

    def attention_linears(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of block i's attention projections (q, k, v, o or fused qkv, o)."""
        return self._block_modules(i, self.spec.attention)

    def mlp_linears(self, i: int) -> dict[str, nn.Module]:
        return self._block_modules(i, self.spec.mlp)

    def block_linears(self, i: int) -> dict[str, nn.Module]:
        if self.spec.generic:  # no attention or MLP roles: every linear found, by position
            return self._block_modules(i, tuple(self.spec.linears))
        return {**self.attention_linears(i), **self.mlp_linears(i), **self.shared_expert_linears(i)}

    def _present(self, i: int, paths: Iterable[str]) -> dict[str, nn.Module]:
        names = (f"{self.block_name(i)}.{p}" for p in paths)
        return {n: self._get(n) for n in names if self._has(n)}

    def experts(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of block i's experts module (`Spec.experts`), empty where the block
        has none (a dense block, a family without experts)."""
        return {} if self.spec.experts is None else self._present(i, (self.spec.experts.path,))

    def shared_expert_linears(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of block i's shared expert linears (Qwen2-MoE), where it has them."""
        return {} if self.spec.experts is None else self._present(i, tuple(self.spec.experts.shared))

    def float_modules(self) -> set[str]:
        """Full names of the modules every method keeps in float: each block's router and shared
        expert gate (`Experts.float_paths`); for a generic spec, the linears found in the blocks that
        it leaves out (a mixture's routers, `lmpress.arch.discover`)."""
        if self.spec.generic:
            blocks = self.model.get_submodule(self.spec.blocks)
            return {
                f"{self.spec.blocks}.{i}.{n}"
                for i, block in enumerate(blocks.children())
                for n, m in block.named_modules()
                if n and is_linear(m) and n not in self.spec.linears
            }
        if self.spec.experts is None:
            return set()
        return {n for i in range(self.num_blocks) for n in self._present(i, self.spec.experts.float_paths)}

    def linears(self) -> dict[str, nn.Module]:
        """Every linear projection inside the decoder blocks, in block order."""
        out: dict[str, nn.Module] = {}
        for i in range(self.num_blocks):
            out.update(self.block_linears(i))
        return out

    def block_tensors(self, i: int) -> dict[str, str]:
        """Full name -> role of block i's float parameters that no method compresses (`Spec.tensors`)."""
        out = {}
        for path, role in self.spec.tensors.items():
            name = f"{self.block_name(i)}.{path}"
            if self._has(name.rpartition(".")[0]):
                out[name] = role
        return out

    def scale_groups(self, i: int) -> list[tuple[str, nn.Module, dict[str, nn.Module]]]:
        """(previous op name, previous op, {linear name: linear}) of block i whose scales can be folded.

        Only groups whose members are all still dense (an earlier stage may have replaced one) and
        whose previous op's output width equals the linears' input width, or whose previous op is a
        fused projection with rows the linears read (`Spec.read_rows`: then an `OutputRows` of it);
        norm groups are dropped for post-norm OPT models (the norm there is not in front of the linears).
        """
        post_norm = not self.spec.is_pre_norm(self.model.config)
        out = []
        for prev_rel, linear_rels in self.spec.scale_groups_for(self.model.config):
            if post_norm and prev_rel in self.spec.norm_paths:
                continue
            prev_name = f"{self.block_name(i)}.{prev_rel}"
            linears = self._block_modules(i, linear_rels)
            if not linears or self._absent(prev_rel, prev_name):  # a block of another kind
                continue
            prev = self._get(prev_name)
            dense = [prev, *linears.values()] if prev_rel not in self.spec.norm_paths else list(linears.values())
            if not all(isinstance(m, nn.Linear) or is_conv1d(m) for m in dense):
                continue
            width = linear_weight(prev).shape[0]  # a norm's weight is (width,)
            reads = {int(linear_weight(m).shape[1]) for m in linears.values()}
            rows = self.spec.read_rows(prev_rel, width, reads.pop()) if len(reads) == 1 else None
            if rows is not None and prev_rel not in self.spec.norm_paths:
                prev, width = OutputRows(prev, rows), rows.stop - rows.start
            if all(linear_weight(m).shape[1] == width for m in linears.values()):
                out.append((prev_name, prev, linears))
        return out

    def block_norms(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of block i's norms (the optional ones only where the model has them)."""
        out = {}
        for n in self.spec.norms:
            name = f"{self.block_name(i)}.{n.path}"
            if n.optional and not self._has(name):
                continue
            out[name] = self._get(name)
        return out

    def _absent(self, rel: str, name: str) -> bool:
        """Block-relative linear ``rel`` (full ``name``) is one only some blocks have, or a norm only
        some models of the family have (Falcon's), and not here."""
        optional = rel in self.spec.optional_linears or any(n.optional and n.path == rel for n in self.spec.norms)
        return (self.spec.generic or optional) and not self._has(name)

    def _has(self, path: str) -> bool:
        try:
            self.model.get_submodule(path)
        except AttributeError:
            return False
        return True

    def linear_roles(self, i: int) -> dict[str, str]:
        """Full name -> role (``attn_q``, ``ffn_down`` ...) of block i's linear projections."""
        return {
            f"{self.block_name(i)}.{p}": r
            for p, r in self.spec.linears.items()
            if not self._absent(p, f"{self.block_name(i)}.{p}")
        }

    def role_name(self, i: int, role: str) -> str:
        """Full name of block i's module with ``role`` (a linear or a norm)."""
        for path, r in self.spec.linears.items():
            if r == role:
                return f"{self.block_name(i)}.{path}"
        for n in self.spec.norms:
            if n.role == role:
                return f"{self.block_name(i)}.{n.path}"
        raise KeyError(f"{self.model_type} blocks have no {role} module")

    def has_role(self, i: int, role: str) -> bool:
        try:
            return self._has(self.role_name(i, role))
        except KeyError:
            return False

    def role(self, i: int, role: str) -> nn.Module:
        """Block i's module with ``role``."""
        return self._get(self.role_name(i, role))

    def norm_kind(self, name: str) -> NormKind | None:
        """What the norm at full ``name`` computes, or None when ``name`` is not a norm."""
        prefix = self.spec.blocks + "."
        if name.startswith(prefix):
            name = name[len(prefix) :].partition(".")[2]
        return self.spec.norm_kind(name)

    def embedding_roles(self) -> dict[str, str]:
        """Full name -> role (``token_embd``, ``position_embd``) of the embeddings."""
        return dict(self.spec.embeddings)

    def embeddings(self) -> dict[str, nn.Module]:
        return {p: self._get(p) for p in self.spec.embeddings}

    def head(self) -> tuple[str, nn.Module]:
        """Name and module of the output head (the projection to the vocabulary)."""
        head = self.model.get_output_embeddings()  # type: ignore[operator]
        for name, m in self.model.named_modules():
            if m is head:
                return name, m
        raise ModelLoadError(f"{self.model_type} model has no output head; lmpress needs a causal LM")

    def final_norm(self) -> tuple[str, nn.Module]:
        """Name and module of what runs between the last block and the head."""
        if self.spec.final_norm is None:
            raise ModelLoadError(
                f"{self.model_type} model: lmpress has no spec for it and cannot tell what runs between its "
                "blocks and its logits; load it whole"
            )
        return self.spec.final_norm.path, self._get(self.spec.final_norm.path)

    def non_embedding_parameters(self) -> int:
        """Parameters outside the embeddings and the output head (tied weights counted once)."""
        skip = {id(p) for m in (*self.embeddings().values(), self.head()[1]) for p in m.parameters()}
        seen: set[int] = set()
        n = 0
        for p in self.model.parameters():
            if id(p) not in skip and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n


class OutputRows(nn.Module):
    """Some output rows of a fused linear, as the previous op of a scale group (Phi-3's up half of
    gate_up_proj): ``weight`` (rows, in) and ``bias`` are views of the linear's, so a scale folded
    into them is folded into the linear."""

    def __init__(self, linear: nn.Module, rows: slice) -> None:
        super().__init__()
        self.weight = linear_weight(linear).detach()[rows]
        bias = getattr(linear, "bias", None)
        self.bias = bias.detach()[rows] if isinstance(bias, Tensor) else None


def _unlisted(model: nn.Module) -> Spec:
    """The spec of a model whose model_type has none: its text decoder's, under its language model
    (a multimodal model, `lmpress.arch.multimodal`), else the generic one found by structure, kept
    on the model (a later stage sees the same blocks and linears, whatever it replaced them with)."""
    spec = model.__dict__.get("_lmpress_spec")
    if not isinstance(spec, Spec):
        spec = language_model_spec(model) or discover(model)
        model.__dict__["_lmpress_spec"] = spec
    return spec


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, and wherever else the same module object is used (weights
    shared across blocks by `lmpress.share` stay shared)."""
    old = model.get_submodule(name)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and callable(getattr(model, "get_output_embeddings", None)):
        ends = (model.get_output_embeddings(), model.get_input_embeddings())  # type: ignore[operator]
        if any(old is m for m in ends):  # one side of a tied pair gets its own tensors: the reload must not re-tie
            config.tie_word_embeddings = False  # type: ignore[union-attr]
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    for m in model.modules():
        for child_name, sub in list(m._modules.items()):
            if sub is old:
                setattr(m, child_name, new)
