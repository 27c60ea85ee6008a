"""docs/architectures.md is generated from actual runs (`benchmarks/coverage.py`); a family added
without regenerating it fails here, with the command that regenerates it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmpress.arch.registry import specs

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "architectures.md"
RESULTS = ROOT / "benchmarks" / "results" / "coverage.json"
REGENERATE = "OMP_NUM_THREADS=1 python -m benchmarks.coverage (it reruns only new or changed families)"


def test_every_family_with_a_spec_is_in_the_table() -> None:
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", DOC.read_text(encoding="utf-8"), flags=re.M))
    missing = sorted(set(specs()) - set(rows))
    assert not missing, f"docs/architectures.md lacks {', '.join(missing)}: regenerate it with {REGENERATE}"
    not_first_class = sorted(t for t in specs() if rows[t].strip() != "first-class")
    assert not not_first_class, f"families with a spec that do not compress: {not_first_class} (see the table)"


def test_the_table_is_the_results() -> None:
    """The table was written from the committed results, not edited by hand."""
    from benchmarks.coverage import doc

    results = json.loads(RESULTS.read_text())["families"]
    assert DOC.read_text(encoding="utf-8") == doc(results), f"docs/architectures.md is stale: {REGENERATE}"
