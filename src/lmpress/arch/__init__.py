"""Model knowledge, the ground floor: the only package that knows a model family.

Each family is one module of `lmpress.arch.families` declaring its `Spec` (where its blocks,
projections, norms and embeddings are, what role each has, its config keys, what llama.cpp and the
ONNX writer call it); `Adapter` finds those parts in a loaded model. Everything above asks these,
never spelling a module path or a family name itself.
"""

from lmpress.arch.adapter import Adapter, linear_weight, replace_module, roles_refusal
from lmpress.arch.config import CONFIG_KEYS, POSITION_KEYS, Shapes
from lmpress.arch.discover import GENERIC_ROLE, discover, is_conv1d, is_linear
from lmpress.arch.multimodal import (
    auto_class,
    has_spec,
    language_model_spec,
    text_config,
    text_model,
    text_model_type,
)
from lmpress.arch.registry import (
    is_supported,
    spec_for,
    specs,
    supported_architectures,
    supporting,
    transformers_knows,
    unknown_architecture,
)
from lmpress.arch.spec import GGUF, Norm, NormKind, Spec, rope_permutation

__all__ = [
    "CONFIG_KEYS",
    "GENERIC_ROLE",
    "GGUF",
    "POSITION_KEYS",
    "Adapter",
    "Norm",
    "NormKind",
    "Shapes",
    "Spec",
    "auto_class",
    "discover",
    "has_spec",
    "is_conv1d",
    "is_linear",
    "is_supported",
    "language_model_spec",
    "linear_weight",
    "replace_module",
    "roles_refusal",
    "rope_permutation",
    "spec_for",
    "specs",
    "supported_architectures",
    "supporting",
    "text_config",
    "text_model",
    "text_model_type",
    "transformers_knows",
    "unknown_architecture",
]
