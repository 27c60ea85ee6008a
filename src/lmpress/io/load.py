"""Loading, safely: built-in names, Hugging Face directories, directories written by lmpress (with
their compressed layers), GGUF files (run by llama.cpp) and ONNX exports (run by ONNX Runtime).

Weights load from safetensors only; a pickle checkpoint (``*.bin``, ``*.pt``, ``*.pth``) is
refused unless ``allow_pickle`` is set, and even then its opcodes are checked first (`lmpress.io.pickles`:
only tensors, no code) and it is read with ``weights_only=True``.
``trust_remote_code`` is off unless asked for. Every check runs before any weights are read, so bad
input fails fast with one line naming the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmpress.arch import auto_class, is_supported, replace_module, transformers_knows, unknown_architecture
from lmpress.arch.kinds import kind_refusal
from lmpress.arch.widths import apply_structure
from lmpress.errors import ModelLoadError
from lmpress.io.consistency import check_finite_weights, check_model_dir, check_plausible, expert_stacks
from lmpress.io.files import META_FILE, check_safetensors, read_config
from lmpress.io.meta import read_json_object, read_meta
from lmpress.io.pickles import check_pickle
from lmpress.io.tensors import parameters_on_meta, read_header, read_tensor
from lmpress.nn import LAYER_FORMATS
from lmpress.progress import phase

BUILTIN_DIR = Path(__file__).parent.parent / "models" / "builtin"


BUILTINS = {"builtin": "reference", "reference": "reference"}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TRAINER_PICKLES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # lmpress.json of a compressed directory


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, " + ", ".join(DTYPES))
    return DTYPES[dtype]


def resolve_path(source: str | Path) -> Path:
    """A model directory from a built-in name or a path; checks it looks like a model."""
    name = str(source)
    if name in BUILTINS:
        path = BUILTIN_DIR / BUILTINS[name]
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"the built-in model is missing from this installation ({path}); reinstall lmpress")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        if "/" not in name and "\\" not in name:
            raise ModelLoadError(
                f"{name!r} is neither a model directory nor a built-in model; built-in names: " + ", ".join(BUILTINS)
            )
        raise ModelLoadError(f"model path {name!r} does not exist; give a Hugging Face model directory or 'builtin'")
    if not path.is_dir():
        raise ModelLoadError(f"model path {name!r} is not a directory; give the directory holding config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name!r} has no config.json; give a Hugging Face model directory")
    return path


def check_weights(path: Path, allow_pickle: bool) -> None:
    """Find the weight files; refuse pickles unless allowed (and then any that holds code); check
    every safetensors file."""
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        for f in safetensors:
            check_safetensors(f)
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle (loads with weights_only=True)"
        )
    if not pickles:
        raise ModelLoadError(f"{path} has no weights (*.safetensors); give a complete model directory")
    # read as opcodes, never run: a weight pickle naming anything but tensors is refused; a trainer's
    # own pickles beside the weights (training_args.bin, optimizer.pt) are never loaded, so not judged
    for name in [n for n in pickles if n not in TRAINER_PICKLES] or pickles:
        check_pickle(path / name)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    for name in TOKENIZER_JSON:  # a garbage file is named here, not deep inside the tokenizers library
        if (path / name).is_file():
            read_json_object(path / name, "restore the model's tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers raises plain Exception subclasses; sentencepiece its own
        refusal = config_refusal(path, e)  # AutoTokenizer reads config.json too
        if refusal is not None:
            raise refusal from None
        named = next((path / n for n in TOKENIZER_JSON if (path / n).is_file()), path)
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise ModelLoadError(
            f"cannot load the tokenizer in {named} ({type(e).__name__}: {reason}); restore the model's tokenizer files"
        ) from None


def load_model(
    source: str | Path = "builtin",
    *,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | Path | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM from a built-in name or a local directory, safely.

    ``dtype`` "auto" keeps the checkpoint's dtype. A directory written by lmpress (with
    ``lmpress.json``) is restored with its compressed layers by `load_compressed`. An exported
    artifact that runs in a runtime of its own (a GGUF file, an ONNX directory) is loaded back by
    its exporter (`lmpress.api.load` asks `lmpress.export.registry`), not here.
    """
    path = resolve_path(source)
    config = read_config(path)
    model_type = config.get("model_type")
    if not (is_supported(model_type) or trust_remote_code or transformers_knows(model_type)):
        raise unknown_architecture(model_type, "neither lmpress nor transformers knows it")
    if (refusal := kind_refusal(config, trust_remote_code)) is not None:
        raise refusal
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    check_weights(path, allow_pickle)
    if (path / META_FILE).is_file():
        check_plausible(config, path / "config.json")
        with phase(f"loading {source}"):
            loaded = load_compressed(path, device=torch_device, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        check_model_dir(path, config, trust_remote_code)  # a config that disagrees with its weights
        with phase(f"loading {source}"):
            loaded = LoadedModel(_from_pretrained(path, torch_dtype, trust_remote_code), None, str(source), path)
    loaded.model.to(torch_device).eval()
    check_finite_weights(loaded.model, source)
    loaded.source = str(source)
    tok_path = resolve_path(tokenizer) if tokenizer is not None else path
    loaded.tokenizer = load_tokenizer(tok_path, trust_remote_code)
    return loaded


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers' own "Loading weights" / "Writing model shards" bars stay off while lmpress
    loads or saves (its bars and log lines are the ones that count the work)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _from_pretrained(path: Path, dtype: torch.dtype | str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with no_transformers_bars():  # the causal LM class, or a multimodal model's own (`arch.auto_class`)
            return auto_class(config).from_pretrained(  # type: ignore[no-any-return]
                path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None, low_cpu_mem_usage=True
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelLoadError(
            f"cannot load the model in {path}: {(str(e) or type(e).__name__).splitlines()[0]}"
        ) from None
    except Exception as e:
        raise config_refusal(path, e) or e from None


def config_refusal(path: Path, e: Exception) -> ModelLoadError | None:
    """One line naming ``config.json`` when ``e`` is transformers refusing one of its fields (its
    configs validate their fields' types as they are built), else None."""
    if not type(e).__name__.startswith("StrictDataclass"):
        return None
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return ModelLoadError(f"{path / 'config.json'}: {lines[-1][:160]}; fix config.json")


def load_compressed(
    path: Path, device: torch.device, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Restore a directory written by `save`, with its compressed layers."""
    meta = read_meta(path)  # every field's shape checked
    modules: dict[str, dict[str, Any]] = meta.get("modules") or {}
    unknown = {str(m.get("format")) for m in modules.values()} - {"dense", *LAYER_FORMATS}
    if unknown:
        raise ModelLoadError(f"{path} uses module formats {sorted(unknown)} that this lmpress cannot load; upgrade")
    structure = meta.get("structure")
    shared = meta.get("shared") or {}
    if structure is None and not shared and all(m.get("format") == "dense" for m in modules.values()):
        model = _from_pretrained(path, dtype, trust_remote_code)
    else:
        try:
            model = _restore(path, modules, dtype, trust_remote_code, structure, shared)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError) as e:
            msg = (str(e) or type(e).__name__).splitlines()[0][:200]
            raise ModelLoadError(
                f"{path}: lmpress.json and the weights do not fit ({msg}); re-run compression"
            ) from None
        except Exception as e:
            raise config_refusal(path, e) or e from None
    return LoadedModel(model, None, str(path), path, meta)


def _restore(
    path: Path,
    modules: dict[str, dict[str, Any]],
    dtype: torch.dtype | str,
    trust_remote_code: bool,
    structure: list[dict[str, int]] | None = None,
    shared: dict[str, str] | None = None,
) -> nn.Module:
    """Build the architecture from its config, swap in the saved layer types, load the tensors."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:  # skip random initialization: every tensor is overwritten by the saved one
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
    with no_init_weights(), parameters_on_meta():  # parameters come from the files (assigned below)
        model = auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # so that tied keys are recognized below
    if structure is not None:
        apply_structure(model, structure)
    for name, fmt in modules.items():
        if fmt.get("format") in LAYER_FORMATS:
            with torch.device("meta"):  # every tensor of a saved layer is in the files
                layer = LAYER_FORMATS[fmt["format"]].from_format(fmt, dtype)  # type: ignore[arg-type]
            replace_module(model, name, layer)
    for alias, source in (shared or {}).items():  # modules saved once, used by several blocks
        parent, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(source))
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):  # read into memory, not mapped: a layer that frees its
        header = read_header(f)  # stored codes (the int4 kernel layout replaces them) then frees the pages
        state.update((k, read_tensor(f, header, k)) for k in header if k != "__metadata__")
    state = _checkpoint_keys_to_model(model, state)
    own = model.state_dict(keep_vars=True)
    for k, v in state.items():  # the model's dtype where the file's differs, as a copying load would give
        if k in own and v.dtype != own[k].dtype and v.is_floating_point() and own[k].is_floating_point():
            state[k] = v.to(own[k].dtype)
    del own
    # the file's tensors become the model's (assign): the architecture's own, never-touched storage is
    # dropped instead of filled, so loading holds one copy of the weights, not two
    tied = set(_tied_keys(model))  # before the load: assigning breaks the ties until tie_weights
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if unexpected or set(missing) - tied:
        bad = sorted(unexpected or set(missing) - tied)[0]
        raise ModelLoadError(f"{path}: weights do not match lmpress.json (first mismatch: {bad}); re-run compression")
    model.tie_weights()
    for m in model.modules():  # a compressed head that reads its embedding table's codes (saved once)
        if getattr(m, "reads_table", False):
            m.tie(model.get_submodule(m.tied_to), m.tied_to)  # type: ignore[operator]
    return model.eval()


def _checkpoint_keys_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key renamings ``save_pretrained`` applies for checkpoint compatibility (GPT-NeoX
    saves ``lm_head`` as ``embed_out``) and the experts it saves one by one (`expert_stacks`), as
    ``from_pretrained`` would."""
    stacks, _ = expert_stacks(model, set(state))
    for key, parts in stacks.items():  # (E, ...) stacked as the experts module holds them
        state[key] = torch.stack([torch.cat([state.pop(k) for k in expert]) for expert in parts])
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5 saves module names unchanged
        return state
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    own = set(model.state_dict())
    if not renamings or set(state) <= own:
        return state
    return {(k if k in own else rename_source_key(k, renamings, [])[0]): v for k, v in state.items()}


def _tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that save_pretrained leaves out because they share a tensor with another."""
    seen: dict[int, str] = {}
    tied = []
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied.append(k)
        seen.setdefault(id(v), k)
    return tied
