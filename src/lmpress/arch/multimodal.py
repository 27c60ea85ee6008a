"""Multimodal checkpoints (Gemma 3 4B+, LLaVA, Mistral 3 ...) whose text decoder is a family lmpress knows.

Such a model wraps a text decoder of a known family (``config.text_config.model_type``: ``gemma3_text``,
``llama``, ``mistral`` ...) beside a vision tower and a projector. Its decoder's spec applies with every
path moved under the language model (``model.layers`` becomes ``model.language_model.layers``): the
text spec's paths all start with its causal LM's base model (``model.``), which here is the module
``get_decoder()`` returns. The head is found as in any model (``get_output_embeddings()``). The vision
tower and the projector are in no spec, so no method, calibration or export ever reaches them: they are
loaded, kept and saved as they are (a streamed run reads and writes them as units of their own,
`kept_modules`). transformers builds such a model with its image-text-to-text class (`auto_class`),
which is also the class that loads the saved directory again; a text-only runtime gets the text part
as its family's causal LM (`text_model`: GGUF for llama.cpp, whose vision part is a separate file).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lmpress.arch.registry import is_supported, spec_for
from lmpress.arch.spec import Norm, Spec

TEXT_CONFIG_KEY = "text_config"  # where transformers' multimodal configs keep the decoder's config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text decoder's part of a ``config.json`` dict: its ``text_config`` where it has one whose
    family lmpress knows (and none of its own), else the config itself."""
    text = config.get(TEXT_CONFIG_KEY)
    return text if isinstance(text, dict) and text_model_type(config) is not None else config


def text_model_type(config: Any) -> str | None:
    """The family whose spec applies to a multimodal ``config`` (a dict or a transformers config):
    its text decoder's model_type where lmpress has that spec and none for the wrapper; else None."""
    if isinstance(config, dict):
        model_type, text = config.get("model_type"), config.get(TEXT_CONFIG_KEY)
        text_type = text.get("model_type") if isinstance(text, dict) else None
        if isinstance(text, dict) and text_type is None:  # the wrapper's default decoder (LLaVA's is Llama)
            text_type = _default_text_type(model_type)
    else:
        model_type = getattr(config, "model_type", None)
        get_text = getattr(config, "get_text_config", None)
        text = get_text(decoder=True) if callable(get_text) else config
        text_type = None if text is config else getattr(text, "model_type", None)
    if is_supported(model_type) or not is_supported(text_type):
        return None
    return str(text_type)


def _default_text_type(model_type: object) -> str | None:
    """The text decoder's model_type transformers gives a multimodal ``model_type`` whose config.json
    leaves it out."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # importing it takes seconds

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    try:
        text = CONFIG_MAPPING[model_type]().get_text_config(decoder=True)
    except Exception:  # a config class that cannot be built with its defaults: no default decoder
        return None
    return getattr(text, "model_type", None)


def has_spec(config: Any) -> bool:
    """lmpress has a spec for this config (a dict or a transformers config): its own family's, or
    its text decoder's for a multimodal one."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return is_supported(model_type) or text_model_type(config) is not None


def language_model_spec(model: nn.Module) -> Spec | None:
    """The text decoder's spec with its paths under the language model, for a multimodal model
    whose decoder's family lmpress knows; None for any other model."""
    text_type = text_model_type(getattr(model, "config", None))
    get_decoder = getattr(model, "get_decoder", None)
    if text_type is None or not callable(get_decoder):
        return None
    decoder = get_decoder()
    lm = next((name for name, m in model.named_modules() if m is decoder and name), None)
    spec = spec_for(text_type)
    base = spec.blocks.split(".", 1)[0] + "."
    paths = [spec.blocks, *spec.embeddings, *([spec.final_norm.path] if spec.final_norm else [])]
    if lm is None or not all(p.startswith(base) for p in [*paths, *([spec.rotary_emb] if spec.rotary_emb else [])]):
        return None

    def moved(path: str) -> str:
        return f"{lm}.{path[len(base) :]}" if path else path

    final = spec.final_norm
    return replace(
        spec,
        blocks=moved(spec.blocks),
        embeddings={moved(p): r for p, r in spec.embeddings.items()},
        final_norm=None if final is None else Norm(moved(final.path), final.role, final.kind, final.optional),
        rotary_emb=moved(spec.rotary_emb),
    )


def auto_class(config: Any) -> Any:
    """The transformers auto class that builds ``config``'s model whole: the causal LM one where it
    maps the config (every text decoder; Gemma 3's multimodal class too), else the image-text-to-text
    one where that maps it (LLaVA, Mistral 3, PaliGemma ...), else the causal LM one (which says why not)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM


def text_model(model: nn.Module) -> nn.Module:
    """A multimodal model's text part as its decoder family's causal LM, made of the model's own
    language model and head (no tensor copied): what a text-only runtime runs (llama.cpp keeps the
    vision part in a separate ``mmproj`` file). Any other model as it is."""
    spec = language_model_spec(model)
    if spec is None:
        return model
    from transformers import AutoModelForCausalLM

    config: Any = model.config
    text = config.get_text_config(decoder=True)
    with torch.device("meta"):
        view = AutoModelForCausalLM.from_config(text)
    setattr(view, spec_for(text.model_type).blocks.split(".", 1)[0], model.get_decoder())  # type: ignore[operator]
    view.set_output_embeddings(model.get_output_embeddings())  # type: ignore[operator]
    view.config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))  # a head lmpress untied
    if any(t.is_meta for t in view.state_dict().values()):  # the causal LM holds more than decoder and head
        return model
    return view.eval()


def kept_modules(model: nn.Module, text: tuple[str, ...]) -> list[str] | None:
    """The modules of a multimodal model outside its ``text`` modules (its language model and head)
    that hold saved tensors, as large as they come (``model.vision_tower``, ``model.multi_modal_projector``):
    what lmpress keeps as it is, read and written whole. None where a module holding the text part
    also holds a tensor of its own (LLaVA-NeXT's ``image_newline``), which no such unit can hold."""
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> bool:
        own = [n for n in module.state_dict(keep_vars=True) if "." not in n]
        if own:
            return False
        for name, child in module.named_children():
            full = prefix + name
            if full in text:
                continue
            if any(t.startswith(full + ".") for t in text):
                if not walk(full + ".", child):
                    return False
            elif next(iter(child.state_dict()), None) is not None:
                out.append(full)
        return True

    return out if walk("", model) else None
