"""Architecture knowledge: where each model family keeps its blocks, projections, embeddings and head.

This is the only module that knows paths like ``model.layers[i].self_attn.q_proj``, GPT-2's
transposed ``Conv1D`` and fused QKV. Methods ask an `Adapter` for "the blocks" or "the attention
projections of block i" and never spell a path themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lmpress.errors import ModelLoadError


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one family. Block-relative names are relative to one decoder block.

    The output head is found with ``get_output_embeddings()``, whose name differs across versions.
    """

    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    norms: tuple[str, ...]
    fused_qkv: bool = False  # one projection produces q, k and v
    conv1d: bool = False  # GPT-2: weights stored (in, out)
    # (previous op, linears reading its output): a per-channel scale can move from the linears'
    # input columns into the previous op's outputs (a norm, or a linear followed by nothing or by a
    # positively homogeneous activation), as AWQ and SmoothQuant need. Groups whose widths do not
    # line up on a given model (grouped-query v -> o, fused qkv -> o) are skipped at run time.
    scale_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()


_LLAMA = ArchSpec(
    blocks="model.layers",
    embeddings=("model.embed_tokens",),
    final_norm="model.norm",
    attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    scale_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": ArchSpec(
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        attention=("attn.c_attn", "attn.c_proj"),
        mlp=("mlp.c_fc", "mlp.c_proj"),
        norms=("ln_1", "ln_2"),
        fused_qkv=True,
        conv1d=True,
        scale_groups=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    ),
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        mlp=("fc1", "fc2"),
        norms=("self_attn_layer_norm", "final_layer_norm"),
        scale_groups=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("self_attn.v_proj", ("self_attn.out_proj",)),
            ("final_layer_norm", ("fc1",)),
            ("fc1", ("fc2",)),  # ReLU is positively homogeneous
        ),
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        embeddings=("gpt_neox.embed_in",),
        final_norm="gpt_neox.final_layer_norm",
        attention=("attention.query_key_value", "attention.dense"),
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        norms=("input_layernorm", "post_attention_layernorm"),
        fused_qkv=True,
        scale_groups=(
            ("input_layernorm", ("attention.query_key_value",)),
            ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
        ),
    ),
    "phi": ArchSpec(
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.final_layernorm",
        attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
        mlp=("mlp.fc1", "mlp.fc2"),
        norms=("input_layernorm",),
        scale_groups=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
            ("self_attn.v_proj", ("self_attn.dense",)),
        ),
    ),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHS)


def unknown_architecture(model_type: object) -> ModelLoadError:
    return ModelLoadError(
        f"unknown architecture {model_type!r} (config.json model_type); lmpress supports: "
        + ", ".join(supported_architectures())
    )


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear-like module as (out, in), a view for ``Conv1D``."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w.T if is_conv1d(module) else w


class Adapter:
    """Finds the parts of one loaded model: blocks, projections, embeddings, head and norms."""

    def __init__(self, model: nn.Module) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHS:
            raise unknown_architecture(model_type)
        self.model = model
        self.model_type: str = model_type
        self.spec = ARCHS[model_type]
        for path in (self.spec.blocks, self.spec.final_norm, *self.spec.embeddings):
            self._get(path)
        for name in (*self.spec.attention, *self.spec.mlp):
            self._get(f"{self.spec.blocks}.0.{name}")

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
        return {f"{self.block_name(i)}.{n}": self._get(f"{self.block_name(i)}.{n}") for n in names}

    def attention_linears(self, i: int) -> dict[str, nn.Module]:
        """Full name -> module of block i's attention projections (q, k, v, o or fused qkv, o)."""
        return self._block_modules(i, self.spec.attention)

    def mlp_linears(self, i: int) -> dict[str, nn.Module]:
        return self._block_modules(i, self.spec.mlp)

    def block_linears(self, i: int) -> dict[str, nn.Module]:
        return {**self.attention_linears(i), **self.mlp_linears(i)}

    def linears(self) -> dict[str, nn.Module]:
        """Every linear projection inside the decoder blocks, in block order."""
        out: dict[str, nn.Module] = {}
        for i in range(self.num_blocks):
            out.update(self.block_linears(i))
        return out

    def scale_groups(self, i: int) -> list[tuple[str, nn.Module, dict[str, nn.Module]]]:
        """(previous op name, previous op, {linear name: linear}) of block i whose scales can be folded.

        Only groups whose members are all still dense (an earlier stage may have replaced one) and
        whose previous op's output width equals the linears' input width; norm groups are dropped
        for post-norm OPT models (the norm there is not in front of the linears).
        """
        post_norm = self.model_type == "opt" and not getattr(self.model.config, "do_layer_norm_before", True)
        out = []
        for prev_rel, linear_rels in self.spec.scale_groups:
            if post_norm and prev_rel in self.spec.norms:
                continue
            prev_name = f"{self.block_name(i)}.{prev_rel}"
            prev = self._get(prev_name)
            linears = self._block_modules(i, linear_rels)
            dense = [prev, *linears.values()] if prev_rel not in self.spec.norms else list(linears.values())
            if not all(isinstance(m, nn.Linear) or is_conv1d(m) for m in dense):
                continue
            width = linear_weight(prev).shape[0]  # a norm's weight is (width,)
            if all(linear_weight(m).shape[1] == width for m in linears.values()):
                out.append((prev_name, prev, linears))
        return out

    def block_norms(self, i: int) -> dict[str, nn.Module]:
        return self._block_modules(i, self.spec.norms)

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
        return self.spec.final_norm, self._get(self.spec.final_norm)

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
