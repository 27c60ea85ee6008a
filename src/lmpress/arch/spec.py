"""What lmpress knows about one model family, declared once: the `Spec`.

A spec names where a family keeps its parts and what each part is for. Every tensor-holding module
gets a *role* in one vocabulary shared by all families: llama.cpp's tensor names (``token_embd``,
``attn_q``, ``attn_qkv``, ``attn_output``, ``ffn_gate``, ``ffn_up``, ``ffn_down``, ``attn_norm``,
``ffn_norm``, ``output_norm`` ...), so that a method asks for "the value projection" and an exporter
for "the tensor llama.cpp calls attn_v" with the same word. A norm also says what it computes
(its `NormKind`), because a scale folded into a norm is folded differently when the norm
multiplies by ``1 + w`` (Gemma) than by ``w``.

Paths inside a block are relative to the block (``self_attn.q_proj``); the others are from the
model's root (``model.embed_tokens``). The output head is found with ``get_output_embeddings()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

# LayerNorm (mean and variance, optional bias), RMSNorm (y = w * x / rms), RMSNorm over 1 + w (Gemma);
# unknown: a module found by structure in a model without a spec (`lmpress.arch.discover`), never
# folded into or exported
NormKind = Literal["layernorm", "rmsnorm", "rmsnorm_1p", "unknown"]
# separate q/k/v projections; one fused projection whose rows are [q | k | v], the query heads then
# the key/value heads (GPT-2, Phi-3's grouped-query qkv_proj); one whose rows are per key/value head
# [q × heads per group | k | v] (GPT-NeoX: one query head per group, [q_h | k_h | v_h] triples)
QKVLayout = Literal["separate", "concat", "per_head"]
ATTENTION_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
# a block that mixes tokens with a gated short convolution instead (LFM2): its input and output
# projections stand where attention's do (`Spec.attention`)
SHORTCONV_ROLES = ("shortconv_in_proj", "shortconv_out_proj")
MLP_ROLES = ("ffn_gate", "ffn_up", "ffn_down")
# a mixture of experts' stacked expert tensors, as llama.cpp names them (`Experts`)
EXPERT_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@dataclass(frozen=True)
class Norm:
    """A norm: its path, its role and what it computes. ``optional``: only some models of the
    family have it (Qwen3's query/key norms exist, Qwen2's do not)."""

    path: str
    role: str
    kind: NormKind
    optional: bool = False


@dataclass(frozen=True)
class Experts:
    """A block's mixture of experts: a router picks ``top_k_key`` of ``count_key`` experts per token
    and the experts module (``path``, block-relative) runs only those, each a gated MLP
    ``down(act(gate x) * up x)`` (act: the config's ``hidden_act``) weighted by the router.

    The experts are 3-D parameters of the experts module, one matrix per expert: ``gate_up``
    (E, 2·I, H) with rows [gate | up] (``fused``), or ``gate`` and ``up`` apart (then ``gate_up``
    names the gate's); ``down`` (E, H, I); ``transposed``: stored (E, in, out) instead. Their roles
    are llama.cpp's ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``. The router (``ffn_gate_inp``)
    and a shared expert's gate (``ffn_gate_inp_shexp``) are kept in float by every method; the
    shared expert's linears (``shared``: path -> role, ``ffn_*_shexp``) are ordinary linears. Blocks
    without the experts module (a dense layer of Qwen2-MoE's ``mlp_only_layers``) are skipped."""

    path: str
    router: str
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    up: str | None = None  # the up projections' parameter where gate and up are stored apart
    transposed: bool = False
    count_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    shared: dict[str, str] = field(default_factory=dict)
    shared_gate: str | None = None

    @property
    def fused(self) -> bool:
        return self.up is None

    @property
    def float_paths(self) -> tuple[str, ...]:
        """Block-relative paths every method keeps in float: the router and the shared expert's gate."""
        return (self.router,) + ((self.shared_gate,) if self.shared_gate else ())


@dataclass(frozen=True)
class GGUF:
    """How llama.cpp names the family and reads its hyper-parameters.

    ``metadata(config, n_vocab)``: llama.cpp's keys for a config (refusing, with an `ExportError`,
    what its architecture cannot run). ``permute_qk``: llama.cpp's converter reorders the query and
    key rows of this family for its rotary layout. ``rope_freqs``: llama3 rope is written as the
    ``rope_freqs.weight`` tensor. ``row_order(role, rows, config)``: the family's own order of a
    projection's rows (None: the same), where it is written as an architecture whose rotary pairs
    dimensions differently (GPT-J's neighbouring pairs as ``phi2``'s halves). ``zero_biases``: roles
    whose bias the architecture requires, written as zeros where the model has none. ``tied_output``:
    the architecture reads ``output.weight`` even where the head is tied to the embeddings (llama.cpp's
    gptneox, phi2, stablelm, olmo2): a tied head is written as a copy of the table.
    """

    arch: str
    metadata: Callable[[Any, int], dict[str, Any]]
    permute_qk: bool = False
    rope_freqs: bool = False
    row_order: Callable[[str, int, Any], Tensor | None] | None = None
    zero_biases: tuple[str, ...] = ()
    tied_output: bool = False
    # name -> tensor: tensors llama.cpp reads that the config defines (Phi-3's long-rope factors)
    config_tensors: Callable[[Any], dict[str, Tensor]] | None = None
    # role -> tensor name, where the architecture names a part apart from the shared vocabulary
    # (llama.cpp's lfm2 calls its final norm token_embd_norm)
    names: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """One model family: every fact about it that lmpress uses, in one place."""

    model_types: tuple[str, ...]  # the config.json model_type values this spec describes
    blocks: str  # the ModuleList of decoder blocks
    embeddings: dict[str, str]  # path -> role; the token embedding first, then learned positions
    final_norm: Norm | None  # None: a generic spec that could not tell which module follows the blocks
    linears: dict[str, str]  # block-relative path -> role, attention first, in the order they compute
    norms: tuple[Norm, ...]  # block-relative
    # block-relative paths of the linears only some blocks have: a model whose blocks are of several
    # kinds (LFM2's attention and short-convolution layers) has in each block only its kind's
    optional_linears: tuple[str, ...] = ()
    # block-relative path of a parameter -> role: float tensors no method compresses, kept as they
    # are and exported (LFM2's depthwise convolution kernels)
    tensors: dict[str, str] = field(default_factory=dict)
    qkv: QKVLayout = "separate"
    # what the optional attn_q_norm / attn_k_norm normalize: each head (Qwen3) or the whole
    # projection output, all heads at once (OLMo 2), which loses a head's rows with the head
    qk_norm: Literal["head", "projection"] = "head"
    # the MLP's gate and up projections are one linear whose rows are [gate | up] (Phi-3's gate_up_proj,
    # llama.cpp's ffn_up of twice the width): a neuron is a row of each half
    gate_up: bool = False
    # the attention splits its fused qkv by the config's head count at run time (Phi-3): a block
    # with fewer heads gets a config of its own (`lmpress.arch.widths.keep_attention_units`)
    heads_from_config: bool = False
    conv1d: bool = False  # GPT-2: linear weights stored (in, out)
    # (previous op, linears reading its output): a per-channel scale can move from the linears'
    # input columns into the previous op's outputs (a norm, or a linear followed by nothing or by a
    # positively homogeneous activation), as AWQ and SmoothQuant need. Groups whose widths do not
    # line up on a given model (grouped-query v -> o, fused qkv -> o) are skipped at run time.
    scale_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mlp_width_key: str = "intermediate_size"  # the config key of the MLP width
    head_dim_in_config: bool = False  # the config has head_dim: fewer heads at the same width still load
    embed_scale: bool = False  # the model multiplies the token embeddings by sqrt(hidden) (from its config)
    tied_by_default: bool = False  # tie_word_embeddings when config.json does not say
    rotary_emb: str = ""  # the module that computes rotary cos/sin for the whole model, where there is one
    # what the model's forward does to the head's output (Cohere's logit_scale), for a run that applies
    # the head itself (a streamed evaluation): (config, logits) -> logits
    logits_after_head: Callable[[Any, Tensor], Tensor] | None = None
    pre_norm_key: str | None = None  # a config flag that, when false, puts the norms after the sublayers
    # a config flag that, when true, feeds the MLP from the attention's norm (StableLM's parallel
    # residual): the first norm's scale group takes the second's linears, and the second norm is absent
    parallel_key: str | None = None
    experts: Experts | None = None  # the block's mixture of experts, where it has one
    gguf: GGUF | None = None
    onnx: Literal["llama", "gpt2"] | None = None  # the graph lmpress's ONNX writer builds for it
    onnx_refuse: Callable[[Any], str | None] = field(default=lambda config: None)  # why not, for a config
    # why a config's attention heads cannot be removed (Falcon's ALiBi: a slope per head of the config's
    # count), for structured pruning to refuse in one line; None: they can
    heads_refuse: Callable[[Any], str | None] = field(default=lambda config: None)
    # found by structure (`lmpress.arch.discover`), not declared: every linear's role is unknown
    # ("linear"), and there are no norms, scale groups, config keys or runtime names
    generic: bool = False

    @property
    def name(self) -> str:
        return self.model_types[0]

    @property
    def attention(self) -> tuple[str, ...]:
        """Block-relative paths of the attention projections (q, k, v, o or fused qkv, o), and of a
        short convolution's (in, out) where a block mixes tokens with one instead."""
        return tuple(p for p, r in self.linears.items() if r in ATTENTION_ROLES + SHORTCONV_ROLES)

    @property
    def mlp(self) -> tuple[str, ...]:
        """Block-relative paths of the MLP projections, the output projection last."""
        return tuple(p for p, r in self.linears.items() if r in MLP_ROLES)

    @property
    def attention_module(self) -> str:
        """Block-relative path of the attention module (the parent of its projections)."""
        return self.attention[0].rsplit(".", 1)[0]

    @property
    def norm_paths(self) -> tuple[str, ...]:
        return tuple(n.path for n in self.norms)

    @property
    def fused_qkv(self) -> bool:
        return self.qkv != "separate"

    @property
    def gated(self) -> bool:
        """A gated MLP (gate, up, down) rather than two projections."""
        return self.gate_up or "ffn_gate" in self.linears.values()

    @property
    def hidden_prunable(self) -> bool:
        """Hidden channels can be removed: the config can state the head width apart from the
        hidden size, and nothing reads the hidden size from the config at run time (nor a q/k norm
        over a whole projection, which can be as wide as the hidden size), and no experts (3-D, not cut yet)."""
        return self.head_dim_in_config and not self.embed_scale and self.qk_norm == "head" and self.experts is None

    def token_embedding(self) -> str:
        return next(iter(self.embeddings))

    def norm_kind(self, path: str) -> NormKind | None:
        """The kind of the block norm at block-relative ``path`` (or the final norm), else None."""
        for n in (*self.norms, self.final_norm):
            if n is not None and n.path == path:
                return n.kind
        return None

    def is_pre_norm(self, config: Any) -> bool:
        return self.pre_norm_key is None or bool(getattr(config, self.pre_norm_key, True))

    def scale_groups_for(self, config: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The scale groups of a model with ``config``: where ``parallel_key`` is set in it, the first
        norm's group takes the linears of the second norm's group (one norm feeds both sublayers)."""
        if self.parallel_key is None or not getattr(config, self.parallel_key, False):
            return self.scale_groups
        (first, reads), (second, more) = [g for g in self.scale_groups if g[0] in self.norm_paths][:2]
        merged = {first: (first, reads + more)}
        return tuple(merged.get(g[0], g) for g in self.scale_groups if g[0] != second)

    def gguf_row_order(self, role: str, rows: int, config: Any) -> Tensor | None:
        """How llama.cpp orders the output rows of a projection, as indices into the model's rows
        (None: the same). Llama q/k: the rotary halves interleaved per head; GPT-NeoX's fused
        q/k/v: per-head [q k v] triples regrouped as all q, all k, all v (`group_order`)."""
        if self.gguf is not None and self.gguf.row_order is not None:
            return self.gguf.row_order(role, rows, config)
        heads = getattr(config, "num_attention_heads", 0)
        if self.gguf is not None and self.gguf.permute_qk and role in ("attn_q", "attn_k"):
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            return rope_permutation(rows, heads if role == "attn_q" else kv_heads)
        if self.qkv == "per_head" and role == "attn_qkv":  # a family with fewer groups: its GGUF.row_order
            return group_order(rows, heads, heads)
        return None

    def read_rows(self, path: str, rows: int, width: int) -> slice | None:
        """The output rows of the fused projection at block-relative ``path`` (``rows`` of them) that
        the next linear, ``width`` inputs wide, reads and a per-channel scale can fold into: the up
        half of a fused gate/up (down reads up · act(gate), linear in up; the gate half is behind the
        activation), the v rows of a [q | k | v] projection where every query head has its own
        key/value head (o reads attention-weighted sums of v). None elsewhere (grouped-query v)."""
        role = self.linears.get(path)
        if role == "ffn_up" and self.gate_up and rows == 2 * width:
            return slice(width, rows)
        if role == "attn_qkv" and self.qkv == "concat" and rows == 3 * width:
            return slice(2 * width, rows)
        return None


def group_order(rows: int, heads: int, kv_heads: int) -> Tensor:
    """Rows of a projection laid out per key/value group, [q × heads/kv_heads | k | v] each, as
    indices that regroup them into [all q | all k | all v].  -> (rows,)"""
    per = heads // kv_heads
    idx = torch.arange(rows).view(kv_heads, per + 2, rows // (heads + 2 * kv_heads))  # (group, head, dim)
    return torch.cat([idx[:, :per].reshape(-1), idx[:, per].reshape(-1), idx[:, per + 1].reshape(-1)])


def rope_permutation(rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp's converter gives Llama q/k projections: within each head, the two
    rotary halves interleaved.  -> (rows,) indices"""
    return torch.arange(rows).view(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)
