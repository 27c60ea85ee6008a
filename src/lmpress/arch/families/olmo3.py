"""OLMo 3: OLMo 2's block (post-norms, query/key RMSNorms over each whole projection) with
sliding-window layers (three local, then one global, by default) and a rotary setting per layer
type. llama.cpp runs it as ``olmo2`` with the window and its period; its local layers take the
global layers' base without scaling, so a config whose two layer types rotate differently is
refused for GGUF."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lmpress.arch.families.gemma2 import swa_period
from lmpress.arch.families.olmo2 import OLMO2
from lmpress.arch.gguf_keys import rms_metadata
from lmpress.arch.spec import GGUF
from lmpress.errors import ExportError
from lmpress.formats.gguf_file import U32


def gguf_metadata(config: Any, n_vocab: int) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or {}
    ropes = [dict(params.get(t) or {}) for t in ("full_attention", "sliding_attention")]
    if any(r.get("rope_type", "default") != "default" for r in ropes) or ropes[0] != ropes[1]:
        raise ExportError(
            f"OLMo 3 with rope {params}: llama.cpp's olmo2 gives both layer types one default rope; "
            "export a model whose layer types share it"
        )
    plain = replace_rope(config, ropes[0])
    meta = rms_metadata(plain, "olmo2", n_vocab)
    if getattr(config, "sliding_window", None) is not None:
        meta["olmo2.attention.sliding_window"] = U32(config.sliding_window)
        meta["olmo2.attention.sliding_window_pattern"] = U32(swa_period(config, "OLMo 3", 4))
    return meta


def replace_rope(config: Any, rope: dict[str, Any]) -> Any:
    """A view of ``config`` whose rotary setting is the one ``rope`` (for the shared metadata keys)."""

    class View:
        def __getattr__(self, key: str) -> Any:
            return rope if key == "rope_parameters" else getattr(config, key)

    return View()


SPECS = (
    replace(
        OLMO2,
        model_types=("olmo3",),
        gguf=GGUF("olmo2", gguf_metadata, tied_output=True),
    ),
)
