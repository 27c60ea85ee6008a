"""Compressed layer types; each owns its packed storage and its forward.

Every one is a `CompressedLayer` (`lmpress.nn.base`: what a layer provides to be saved, loaded,
moved, trained and exported). `LAYER_FORMATS` maps the ``format`` a layer writes into
``lmpress.json`` to its class, whose ``from_format`` builds an empty layer for loading; importing
this package defines (and so registers) every layer class.
"""

from lmpress.nn.base import LAYER_FORMATS, CompressedLayer
from lmpress.nn.codebook_linear import CodebookLinear
from lmpress.nn.gguf_linear import GGUFEmbedding, GGUFLinear
from lmpress.nn.lora_linear import LoRALinear
from lmpress.nn.lowrank_linear import LowRankLinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_experts import QuantExperts
from lmpress.nn.quant_linear import QuantLinear
from lmpress.nn.sparse_linear import SparseLinear

__all__ = [
    "LAYER_FORMATS",
    "CodebookLinear",
    "CompressedLayer",
    "GGUFEmbedding",
    "GGUFLinear",
    "LoRALinear",
    "LowRankLinear",
    "QuantEmbedding",
    "QuantExperts",
    "QuantLinear",
    "SparseLinear",
]
