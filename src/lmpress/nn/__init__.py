"""Compressed layer types; each owns its packed storage and its forward.

`LAYER_FORMATS` maps the ``format`` a layer writes into ``lmpress.json`` to its class, whose
``from_format`` builds an empty layer for loading.
"""

from lmpress.nn.codebook_linear import CodebookLinear
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.lora_linear import LoRALinear
from lmpress.nn.lowrank_linear import LowRankLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.nn.sparse_linear import SparseLinear

LayerType = (
    type[QuantLinear]
    | type[QuantEmbedding]
    | type[SparseLinear]
    | type[LoRALinear]
    | type[LowRankLinear]
    | type[CodebookLinear]
    | type[GGUFLinear]
    | type[GGUFEmbedding]
)
LAYER_FORMATS: dict[str, LayerType] = {
    "codebook": CodebookLinear,
    "gguf": GGUFLinear,
    "gguf_embedding": GGUFEmbedding,
    "lora": LoRALinear,
    "lowrank": LowRankLinear,
    "quant": QuantLinear,
    "quant_embedding": QuantEmbedding,
    "sparse": SparseLinear,
}

__all__ = [
    "LAYER_FORMATS",
    "CodebookLinear",
    "GGUFEmbedding",
    "GGUFLinear",
    "LoRALinear",
    "LowRankLinear",
    "QuantEmbedding",
    "QuantLinear",
    "SparseLinear",
]
