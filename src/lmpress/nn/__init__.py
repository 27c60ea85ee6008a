"""Compressed layer types; each owns its packed storage and its forward.

`LAYER_FORMATS` maps the ``format`` a layer writes into ``lmpress.json`` to its class, whose
``from_format`` builds an empty layer for loading.
"""

from lmpress.nn.lora_linear import LoRALinear
from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear
from lmpress.nn.sparse_linear import SparseLinear

LAYER_FORMATS: dict[str, type[QuantLinear] | type[QuantEmbedding] | type[SparseLinear] | type[LoRALinear]] = {
    "lora": LoRALinear,
    "quant": QuantLinear,
    "quant_embedding": QuantEmbedding,
    "sparse": SparseLinear,
}

__all__ = ["LAYER_FORMATS", "LoRALinear", "QuantEmbedding", "QuantLinear", "SparseLinear"]
