"""Every family lmpress knows, by ``config.json`` ``model_type``: found in `lmpress.arch.families`,
one module per family, so that adding a family is adding one file. A model_type without a spec
that transformers builds is opened by its structure (`lmpress.arch.discover`)."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from lmpress.arch import families
from lmpress.arch.spec import Spec
from lmpress.errors import ModelLoadError


@cache
def specs() -> dict[str, Spec]:
    """model_type -> spec, over every module of `lmpress.arch.families`."""
    out: dict[str, Spec] = {}
    for info in sorted(pkgutil.iter_modules(families.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{families.__name__}.{info.name}")
        for spec in module.SPECS:
            for model_type in spec.model_types:
                if model_type in out:
                    raise RuntimeError(f"model_type {model_type!r} is declared twice (arch/families/{info.name}.py)")
                out[model_type] = spec
    return out


def is_supported(model_type: object) -> bool:
    return isinstance(model_type, str) and model_type in specs()


def transformers_knows(model_type: object) -> bool:
    """transformers has a config class for ``model_type`` (it may build it without a spec here)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # importing it takes seconds

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def spec_for(model_type: object) -> Spec:
    """The spec of a model_type, or the one-line error that lists the supported ones."""
    if not is_supported(model_type):
        raise unknown_architecture(model_type)
    assert isinstance(model_type, str)
    return specs()[model_type]


def supported_architectures() -> list[str]:
    return sorted(specs())


def unknown_architecture(model_type: object, why: str = "lmpress has no spec for it") -> ModelLoadError:
    return ModelLoadError(
        f"unknown architecture {model_type!r} (config.json model_type): {why}; lmpress supports: "
        + ", ".join(supported_architectures())
        + " by spec, and other transformers decoders by their structure (docs/architectures.md)"
    )


def supporting(predicate: str) -> list[str]:
    """The model_types whose spec has the named truthy attribute (``gguf``, ``onnx``,
    ``head_dim_in_config``), sorted: for messages that list what an operation supports."""
    return sorted(t for t, s in specs().items() if getattr(s, predicate))
