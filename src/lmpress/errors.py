"""User-facing errors: one line that names the problem and the fix.

Everything lmpress raises on bad input is an `LmpressError`; the CLI prints its message and exits
with code 2, with no traceback.
"""

from __future__ import annotations


class LmpressError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


class ModelLoadError(LmpressError):
    """A model path, built-in name, checkpoint or architecture that cannot be loaded."""


class DataError(LmpressError):
    """Text data that is missing, empty or too short."""


class RecipeError(LmpressError):
    """A recipe that is not valid YAML or does not match its methods' configs."""


class OutputError(LmpressError):
    """An output location that cannot be written safely."""


class TrainError(LmpressError):
    """Training that cannot start or continue: a bad budget, too little data, a foreign checkpoint."""


class EvaluationError(LmpressError):
    """A measurement that would be a wrong number: non-finite logits, windows past the positions."""


class ExportError(LmpressError):
    """A model or layer that the target format cannot hold as asked."""
