"""Where loading lived before `lmpress.io` held both loading and saving; these names stay
importable from here for code written against earlier versions."""

from lmpress.io.files import META_FILE, check_safetensors, read_config
from lmpress.io.load import (
    BUILTIN_DIR,
    BUILTINS,
    DTYPES,
    PICKLE_SUFFIXES,
    LoadedModel,
    _from_pretrained,
    check_weights,
    load_compressed,
    load_model,
    load_tokenizer,
    no_transformers_bars,
    resolve_device,
    resolve_dtype,
    resolve_path,
)

__all__ = [
    "BUILTINS",
    "BUILTIN_DIR",
    "DTYPES",
    "META_FILE",
    "PICKLE_SUFFIXES",
    "LoadedModel",
    "_from_pretrained",
    "check_safetensors",
    "check_weights",
    "load_compressed",
    "load_model",
    "load_tokenizer",
    "no_transformers_bars",
    "read_config",
    "resolve_device",
    "resolve_dtype",
    "resolve_path",
]
