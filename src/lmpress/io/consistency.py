"""A model that lies is refused before any work: its config against plausible sizes, and every
tensor of its weights against the shape and dtype its config implies.

transformers builds a model from ``config.json`` and then fills it from the weights; a tensor whose
shape disagrees with the config stops it deep in a matmul (or, in a streamed run, after minutes of
work), and a tensor the config expects but the files lack is initialised at random, with a warning
at most. Here the architecture is built on the ``meta`` device (no memory, no initialisation) and
compared with the safetensors headers (no tensor is read), so the one line that names the tensor,
both shapes and the config key comes before anything is loaded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmpress.arch import CONFIG_KEYS, POSITION_KEYS, Shapes, auto_class
from lmpress.errors import ModelLoadError
from lmpress.io.tensors import read_header

log = logging.getLogger(__name__)

# The widest any released decoder goes, with room to spare: a config beyond these is a typo or a
# hostile file, and building it (even to estimate its memory) would hang or exhaust the machine.
LIMITS = {
    "layers": 1024,
    "vocab": 4 * 2**20,
    "hidden": 2**17,
    "intermediate": 2**20,
    "heads": 2048,
    "experts": 4096,
}
# safetensors dtypes a floating-point parameter may be stored in
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _configs(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The config and its nested text config (multimodal wrappers keep the decoder's sizes there)."""
    found = [("", config)]
    for key in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(key), dict):
            found.append((f"{key}.", config[key]))
    return found


def check_plausible(config: dict[str, Any], file: Path) -> None:
    """Refuse sizes outside any plausible range (a negative width, 200,000 layers, a vocabulary of a
    billion), naming the key, its value, the limit and what such a model would need."""
    for prefix, cfg in _configs(config):
        for kind, keys in CONFIG_KEYS.items():
            for key in keys:
                value = cfg.get(key)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ModelLoadError(
                        f"{file}: {prefix}{key} must be a whole number, got {_short(value)}; fix config.json"
                    )
                if value < (0 if kind == "experts" else 1) or value > LIMITS[kind]:
                    raise ModelLoadError(
                        f"{file}: {prefix}{key}={value} is outside any plausible range (1..{LIMITS[kind]:,})"
                        f"{_need(cfg)}; fix config.json"
                    )
        for key in POSITION_KEYS:
            value = cfg.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelLoadError(f"{file}: {prefix}{key} must be a positive whole number, got {_short(value)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _need(config: dict[str, Any]) -> str:
    """', a model of this config would hold N parameters (X GB in bf16)' where the sizes allow it."""
    try:
        params = Shapes.of(config).params
    except (TypeError, ValueError, ZeroDivisionError):
        return ""
    return f"; a model of this config would hold {params:,} parameters ({2 * params / 1e9:,.1f} GB in bf16)"


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if the config does not say."""
    for _, cfg in reversed(_configs(config)):
        for key in POSITION_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_seq_len(config: dict[str, Any], seq_len: int, source: object) -> None:
    """Refuse windows longer than the positions the model was built for: beyond them a learned
    position table has no rows and rotary models run outside anything they were trained on, so the
    perplexity would be a wrong number, not a measurement."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ModelLoadError(
            f"--seq-len {seq_len} is longer than {source}'s positions ({limit}, config.json); use --seq-len {limit} "
            "or less"
        )


@dataclass(frozen=True)
class _Stored:
    file: str
    shape: tuple[int, ...]
    dtype: str


def _stored_tensors(path: Path) -> dict[str, _Stored]:
    """Every tensor of a directory's safetensors files (name -> file, shape, dtype), from headers only."""
    stored: dict[str, _Stored] = {}
    for f in sorted(path.glob("*.safetensors")):
        for name, entry in read_header(f).items():
            if name != "__metadata__":
                stored[name] = _Stored(f.name, tuple(int(d) for d in entry["shape"]), str(entry["dtype"]))
    return stored


def _meta_model(path: Path, trust_remote_code: bool) -> torch.nn.Module | None:
    """The architecture of ``path``'s config, built on the meta device; None if transformers cannot
    build it (the load that follows reports why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = auto_class(config).from_config(config, trust_remote_code=trust_remote_code)
        model.tie_weights()  # a tied head shares the embeddings' tensor: saved once, not missing
        return model  # type: ignore[no-any-return]
    except Exception as e:
        log.debug("not checking %s against its config: %s", path, e)
        return None


def checkpoint_names(model: torch.nn.Module, names: list[str]) -> dict[str, str] | None:
    """File name -> model name under transformers' checkpoint conversions (GPT-NeoX's ``embed_out``
    is ``lm_head``); None where a conversion merges tensors (fused experts): then names do not map
    one to one and only the loader can check them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5 keeps module names
        return {n: n for n in names}
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    own = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for n in names:
        m = n if n in own or not renamings else rename_source_key(n, renamings, [])[0]
        if m not in own and prefix and f"{prefix}.{m}" in own:  # a base model's checkpoint
            m = f"{prefix}.{m}"
        out[n] = m
    return out


def as_saved(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (model keys) as ``save_pretrained`` writes them: transformers' checkpoint
    conversions reversed (GPT-NeoX's ``lm_head`` saved as ``embed_out``, EXAONE's ``model.layers``
    as ``transformer.h``, a mixture's stacked experts split one by one as its checkpoints hold
    them), so a streamed save, one unit at a time, writes what a whole one does. Meta tensors give
    the names, dtypes and shapes without the data."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 saves module names unchanged
        return tensors
    try:
        return dict(revert_weight_conversion(model, dict(tensors)))  # type: ignore[arg-type]
    except Exception as e:  # a conversion that cannot be undone on these alone: module names
        log.debug("saving under module names: %s", e)
        return tensors


def expert_stacks(model: torch.nn.Module, names: set[str]) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """Where a checkpoint stores a mixture's experts one by one and the model holds them stacked
    (transformers' converters that merge a module list, then concatenate: Qwen3-MoE's
    ``experts.{e}.gate_proj`` and ``up_proj`` are ``experts.gate_up_proj[e]``): model key -> for
    each expert, the file keys whose rows make its matrix; and model key -> file key for the other
    tensors the same conversions rename (Mixtral's ``block_sparse_moe`` is ``mlp``). Empty where
    nothing merges."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers < 5 keeps experts as modules
        return {}, {}
    transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    merges = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if not merges:
        return {}, {}
    as_model = {rename_source_key(n, renamings, [])[0]: n for n in names}  # model-side name -> file name
    own = dict(model.state_dict(keep_vars=True))
    stacks: dict[str, list[list[str]]] = {}
    for key, t in own.items():
        for c in merges:
            ops = [type(o).__name__ for o in c.operations]
            target = c.target_patterns[0].lstrip(".")
            if key in names or ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
                continue
            if not key.endswith(target) or len(c.target_patterns) != 1:
                continue
            prefix = key[: -len(target)]
            parts = [
                [as_model.get(prefix + p.lstrip(".").replace("*", str(e)), "") for p in c.source_patterns]
                for e in range(t.shape[0])
            ]
            if all(all(parts_e) for parts_e in parts):
                stacks[key] = parts
    renames = {m: f for m, f in as_model.items() if m != f and m in own and m not in names}
    return stacks, renames


def _config_key(config: dict[str, Any], expected: tuple[int, ...], actual: tuple[int, ...]) -> str:
    """The config keys whose value is a dimension the config implies and the file does not have."""
    wanted = {e for e, a in zip(expected, actual, strict=False) if e != a} or set(expected)
    keys = [
        f"{k}={v}"
        for _, cfg in _configs(config)
        for k, v in cfg.items()
        if isinstance(v, int) and not isinstance(v, bool) and v in wanted
    ]
    return ", ".join(keys[:3]) if keys else "the sizes in config.json"


def _ignored(model: torch.nn.Module, attr: str, name: str) -> bool:
    patterns = getattr(model, attr, None) or []
    return any(re.search(p, name) for p in patterns)


def check_against_weights(path: Path, config: dict[str, Any], trust_remote_code: bool = False) -> None:
    """Every tensor the config implies is in the files with that shape and a floating dtype, and
    the files hold no block the config does not have. Reads headers only."""
    if any("quantization_config" in cfg for _, cfg in _configs(config)):
        return  # a quantized checkpoint (compressed-tensors, GPTQ, AWQ ...): its own names, its quantizer checks them
    stored = _stored_tensors(path)
    if not stored:
        return  # pickle weights: the loader reads them
    model = _meta_model(path, trust_remote_code)
    if model is None:
        return
    mapping = checkpoint_names(model, list(stored))
    if mapping is None:
        return
    expected = model.state_dict(keep_vars=True)
    seen_ids: dict[int, str] = {}
    tied = set()
    for k, v in expected.items():
        if id(v) in seen_ids:
            tied.add(k)
        seen_ids.setdefault(id(v), k)
    found: set[str] = set()
    where = path / "config.json"
    for file_name, model_name in mapping.items():
        s = stored[file_name]
        if model_name not in expected:
            if (file_name.endswith((".weight", ".bias"))) and not _ignored(
                model, "_keys_to_ignore_on_load_unexpected", model_name
            ):
                raise ModelLoadError(
                    f"{path / s.file}: tensor {file_name} {list(s.shape)} has no place in the model {where} "
                    f"describes ({_blocks_hint(config, stored)}); fix config.json or give the matching weights"
                )
            continue
        found.add(model_name)
        want = expected[model_name]
        if tuple(want.shape) != s.shape:
            raise ModelLoadError(
                f"{path / s.file}: tensor {file_name} has shape {list(s.shape)}, but config.json implies "
                f"{list(want.shape)} ({_config_key(config, tuple(want.shape), s.shape)}); fix config.json or "
                "give the matching weights"
            )
        if want.is_floating_point() and s.dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(
                f"{path / s.file}: tensor {file_name} is stored as {s.dtype}, not a floating-point type; "
                "re-save the weights"
            )
    persistent = set(model.state_dict())  # non-persistent buffers (rotary frequencies) are not saved
    missing = sorted(
        k
        for k in persistent - found - tied
        if not _ignored(model, "_keys_to_ignore_on_load_missing", k) and not _tied_head(model, k, found)
    )
    if missing:
        raise ModelLoadError(
            f"{path}: config.json implies tensor {missing[0]}, which the weights lack ({len(missing)} missing; "
            f"{_blocks_hint(config, stored)}); fix config.json or give the complete weights"
        )


def _tied_head(model: torch.nn.Module, key: str, found: set[str]) -> bool:
    """A head tied to the embeddings is saved once, as the embeddings: not missing."""
    out = model.get_output_embeddings()  # type: ignore[operator]
    inp = model.get_input_embeddings()  # type: ignore[operator]
    if out is None or inp is None:
        return False
    names = {id(m): n for n, m in model.named_modules()}
    if not key.startswith(f"{names.get(id(out))}."):
        return False
    emb = names.get(id(inp))
    tie = getattr(model.config, "tie_word_embeddings", None)
    text = getattr(model.config, "get_text_config", lambda **_: model.config)(decoder=True)
    tie = getattr(text, "tie_word_embeddings", tie)
    return bool(tie) and emb is not None and f"{emb}.weight" in found


def _blocks_hint(config: dict[str, Any], stored: dict[str, _Stored]) -> str:
    """'config.json says 200000 blocks, the weights hold 2' where the two differ."""
    indices = {int(m.group(1)) for n in stored for m in [re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", n)] if m}
    held = max(indices) + 1 if indices else None
    said = next(
        (cfg.get(k) for _, cfg in reversed(_configs(config)) for k in CONFIG_KEYS["layers"] if cfg.get(k) is not None),
        None,
    )
    if held is not None and said is not None and held != said:
        return f"config.json says {said} blocks, the weights hold {held}"
    return f"the weights hold {len(stored)} tensors"


def check_model_dir(path: Path, config: dict[str, Any], trust_remote_code: bool = False) -> None:
    """Both checks, in order: plausible sizes first (building an absurd config would hang)."""
    check_plausible(config, path / "config.json")
    check_against_weights(path, config, trust_remote_code)


def check_finite_weights(model: torch.nn.Module, source: object) -> None:
    """Refuse a model with a NaN or an infinity in any floating-point parameter: every number
    measured on it would be NaN, and every method would spread it."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not _finite(p):
            raise ModelLoadError(
                f"{source}: tensor {name} holds NaN or infinite values; fix or re-download the weights"
            )


def _finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in ``t``, looked at a million values at a time (a whole-tensor mask would
    add a byte per weight to the peak of a load)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(piece).all()) for piece in flat.split(chunk))
