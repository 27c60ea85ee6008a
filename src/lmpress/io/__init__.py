"""Loading and saving, in one place: every way a model comes in and goes out of lmpress.

- `lmpress.io.load`: built-in names, Hugging Face directories, directories lmpress wrote (their
  compressed layers restored), GGUF files and ONNX exports, safely (safetensors only, no remote
  code unless asked for, every check before any weights are read);
- `lmpress.io.save`: the self-describing directory lmpress writes (``config.json``,
  ``model.safetensors`` or, with packed layers, ``lmpress-packed.safetensors``, the tokenizer and
  ``lmpress.json``: format version, per-module format, the recipe, metrics against the original,
  the data manifest and library versions);
- `lmpress.io.files`: writes that are whole or absent (a hidden temporary directory renamed into
  place only when complete, locked by its process, cleaned by a rerun when that process is gone),
  outputs checked against the input, and checks on files before they are read;
- `lmpress.io.consistency`: a config against plausible sizes and every tensor of its weights
  (headers only), finite weights, windows within the model's positions;
- `lmpress.io.meta` and `lmpress.io.pickles`: ``lmpress.json`` read whole against its schema, and
  pickles judged by their opcodes (never unpickled) before ``--allow-pickle`` loads them.
"""

from lmpress.io.files import (
    FORMAT_VERSION,
    META_FILE,
    atomic_dir,
    check_output_dir,
    check_safetensors,
    read_config,
    weight_bytes,
    write_json_atomic,
    write_text_atomic,
)
from lmpress.io.load import (
    BUILTIN_DIR,
    BUILTINS,
    DTYPES,
    PICKLE_SUFFIXES,
    LoadedModel,
    check_weights,
    load_compressed,
    load_model,
    load_tokenizer,
    no_transformers_bars,
    resolve_device,
    resolve_dtype,
    resolve_path,
)
from lmpress.io.save import (
    library_versions,
    module_formats,
    save,
    save_companions,
    shared_modules,
    update_meta,
)

__all__ = [
    "BUILTINS",
    "BUILTIN_DIR",
    "DTYPES",
    "FORMAT_VERSION",
    "META_FILE",
    "PICKLE_SUFFIXES",
    "LoadedModel",
    "atomic_dir",
    "check_output_dir",
    "check_safetensors",
    "check_weights",
    "library_versions",
    "load_compressed",
    "load_model",
    "load_tokenizer",
    "module_formats",
    "no_transformers_bars",
    "read_config",
    "resolve_device",
    "resolve_dtype",
    "resolve_path",
    "save",
    "save_companions",
    "shared_modules",
    "update_meta",
    "weight_bytes",
    "write_json_atomic",
    "write_text_atomic",
]
