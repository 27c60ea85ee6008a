"""lmpress: make GPT-style language models smaller and faster, and measure what it cost.

import lmpress
result = lmpress.compress("builtin", "bf16", output=Path("out/bf16"))
lmpress.evaluate("out/bf16", reference="builtin").metrics
lmpress.search("builtin", {"budget": {"max_bytes": 40e6}}).study.best
"""

from lmpress.api import (
    DataOptions,
    EvalResult,
    Result,
    SearchOutcome,
    TaskResult,
    compress,
    evaluate,
    evaluate_tasks,
    load,
    save,
    search,
)
from lmpress.errors import LmpressError
from lmpress.version import __version__

__all__ = [
    "DataOptions",
    "EvalResult",
    "LmpressError",
    "Result",
    "SearchOutcome",
    "TaskResult",
    "__version__",
    "compress",
    "evaluate",
    "evaluate_tasks",
    "load",
    "save",
    "search",
]
