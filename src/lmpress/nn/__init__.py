"""Compressed layer types; each owns its packed storage and its forward.

`LAYER_FORMATS` maps the ``format`` a layer writes into ``lmpress.json`` to its class, whose
``from_format`` builds an empty layer for loading.
"""

from lmpress.nn.quant_embedding import QuantEmbedding
from lmpress.nn.quant_linear import QuantLinear

LAYER_FORMATS: dict[str, type[QuantLinear] | type[QuantEmbedding]] = {
    "quant": QuantLinear,
    "quant_embedding": QuantEmbedding,
}

__all__ = ["LAYER_FORMATS", "QuantEmbedding", "QuantLinear"]
