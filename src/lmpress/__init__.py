"""lmpress: make GPT-style language models smaller and faster, and measure what it cost.

import lmpress
result = lmpress.compress("builtin", "bf16", output=Path("out/bf16"))
lmpress.evaluate("out/bf16", reference="builtin").metrics
"""

from lmpress.api import DataOptions, EvalResult, Result, TaskResult, compress, evaluate, evaluate_tasks, load, save
from lmpress.errors import LmpressError
from lmpress.version import __version__

__all__ = [
    "DataOptions",
    "EvalResult",
    "LmpressError",
    "Result",
    "TaskResult",
    "__version__",
    "compress",
    "evaluate",
    "evaluate_tasks",
    "load",
    "save",
]
