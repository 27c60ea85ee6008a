"""Compressed layer types; each owns its packed storage and its forward.

`LAYER_FORMATS` maps the ``format`` a layer writes into ``lmpress.json`` to its class, whose
``from_format`` builds an empty layer for loading.
"""

from lmpress.nn.quant_linear import QuantLinear

LAYER_FORMATS = {"quant": QuantLinear}

__all__ = ["LAYER_FORMATS", "QuantLinear"]
