"""The method registry: recipe name -> (config, apply).

A method is one frozen, validated config and one ``apply(model, config, ctx)`` (their types are in
`lmpress.method`). The method modules are imported by name here, in one place; each defines a
module-level ``METHOD``.
"""

from __future__ import annotations

from functools import cache

from lmpress import cluster, lowrank, share, vocab
from lmpress.distill import distill, qat
from lmpress.federated import stage as federated
from lmpress.method import Method
from lmpress.prune import drop_blocks, hidden, magnitude, sparsegpt, structured, wanda
from lmpress.quant import awq, cast, gptq, hqq, rtn, w8a8

__all__ = ["methods"]


@cache
def methods() -> dict[str, Method]:
    """Every method lmpress knows, by recipe name."""
    found = [cast.METHOD, rtn.METHOD, gptq.METHOD, awq.METHOD, hqq.METHOD, w8a8.METHOD]
    found += [magnitude.METHOD, wanda.METHOD, sparsegpt.METHOD, structured.METHOD]
    found += [drop_blocks.METHOD, hidden.METHOD, lowrank.METHOD, cluster.METHOD, share.METHOD]
    found += [vocab.METHOD, distill.METHOD, qat.METHOD, federated.METHOD]
    return {m.name: m for m in found}
