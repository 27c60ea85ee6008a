"""The shape of the house (issue 30): a static import graph over ``src/lmpress`` and the size limits.

Every ``.py`` file is parsed with `ast` (nothing is imported). An import is *module-level* (it runs
when the module is imported, class bodies included), *function-level* (inside a function, a method
or a lambda) or *typing* (under ``if TYPE_CHECKING:``, never run). ``from P import x`` names the
submodule ``P.x`` when there is one, else the package ``P``; importing ``P.x`` is not counted as an
import of ``P``'s ``__init__``, so a package that imports its own submodules, and submodules that
import their siblings by their full names, make no cycle. The checks:

- no cycle among lmpress modules, function-level imports included;
- no import from a lower floor to a higher one (`FLOORS`, from ``docs``/``ARCHITECTURE.md``'s
  target layout mapped onto today's module names; every module must have a floor);
- an lmpress import inside a function only to defer an optional dependency: the module it names
  imports (itself or through its own module-level lmpress imports) a package of an extra in
  ``pyproject.toml`` (`OPTIONAL`);
- no source file over 400 lines and no function over 80 (a CLI command's option declarations, its
  signature, do not count).

Print the counts with ``python -m tests.test_architecture`` (from the repository root).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "lmpress"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80

# module prefix -> floor; a module takes the floor of its longest matching prefix (those in EXACT match
# only their own __init__). Each floor may import only its own floor and those below.
FLOORS: dict[str, int] = {
    # 1: model-family knowledge and storage math; leaves everything else imports
    "lmpress.arch": 1, "lmpress.formats": 1, "lmpress.errors": 1, "lmpress.version": 1,
    "lmpress.select": 1, "lmpress.progress": 1, "lmpress.models": 1, "lmpress.heap": 1,
    # 2: the compressed layers
    "lmpress.nn": 2,
    # 3: files, safe loading, saving
    "lmpress.io": 3, "lmpress.models.loading": 3,
    # 4: the engine methods run on
    "lmpress.engine": 4, "lmpress.method": 4, "lmpress.calib": 4, "lmpress.streaming": 4,
    "lmpress.memory": 4, "lmpress.data": 4, "lmpress.sources": 4, "lmpress.evaluation": 4,
    "lmpress.speed": 4, "lmpress.tasks": 4, "lmpress.data_options": 4, "lmpress.model_source": 4,
    # 5: the methods
    "lmpress.quant": 5, "lmpress.prune": 5, "lmpress.distill": 5, "lmpress.lowrank": 5,
    "lmpress.cluster": 5, "lmpress.share": 5, "lmpress.vocab": 5, "lmpress.federated": 5,
    # 6: recipes and the compress flow
    "lmpress.run": 6, "lmpress.registry": 6, "lmpress.recipe": 6, "lmpress.recipe_docs": 6,
    "lmpress.pipeline": 6, "lmpress.preflight": 6, "lmpress.streamed_run": 6,
    # 7: exporters
    "lmpress.export": 7,
    # 8: the API and what surrounds a run
    "lmpress.app": 8, "lmpress": 8, "lmpress.api": 8, "lmpress.track": 8, "lmpress.report": 8,
    "lmpress.inspection": 8, "lmpress.recipe_search": 8, "lmpress.demo": 8, "lmpress.models.reference": 8,
    "lmpress.models.card": 8, "lmpress.plots": 8,
    # 9: the command line
    "lmpress.cli": 9,
}  # fmt: skip
EXACT = frozenset({"lmpress", "lmpress.models"})  # packages whose modules each have a floor of their own

# distribution of an extra in pyproject.toml -> the name it is imported by (None: the same import as a
# required dependency, so not optional); the dev extra is for tests only and not listed
EXTRA_IMPORTS: dict[str, str | None] = {
    "gguf": "gguf", "llama-cpp-python": "llama_cpp", "compressed-tensors": "compressed_tensors",
    "onnx": "onnx", "onnxruntime": "onnxruntime", "flwr": "flwr", "lm-eval": "lm_eval",
    "mlflow": None,  # mlflow-ui: the server; lmpress imports mlflow-skinny's `mlflow`, a required dependency
}  # fmt: skip
OPTIONAL = frozenset(name for name in EXTRA_IMPORTS.values() if name)

Where = Literal["module", "function", "typing"]


@dataclass(frozen=True)
class Import:
    src: str  # the importing module
    dst: str  # an lmpress module, or the top-level name of a third-party package
    line: int
    where: Where
    ours: bool  # dst is an lmpress module


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: list[Import] = field(default_factory=list)
    functions: list[tuple[str, int, int]] = field(default_factory=list)  # (qualified name, first line, lines)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Scan(ast.NodeVisitor):
    """Collects one file's imports (with where they sit) and its functions' lengths."""

    def __init__(self, mod: Module, names: set[str], cli: bool) -> None:
        self.mod, self.names, self.cli = mod, names, cli
        self.scope: list[str] = []  # enclosing classes and functions
        self.depth = 0  # enclosing functions
        self.typing = False
        self.package = mod.name if mod.path.name == "__init__.py" else mod.name.rpartition(".")[0]

    def _add(self, dst: str, line: int) -> None:
        where: Where = "function" if self.depth else "typing" if self.typing else "module"
        ours = dst == "lmpress" or dst.startswith("lmpress.")
        if not ours and (dst in sys.stdlib_module_names or dst == "__future__"):
            return
        self.mod.imports.append(Import(self.mod.name, dst, line, where, ours))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name if alias.name.startswith("lmpress") else alias.name.split(".")[0], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        if not base.startswith("lmpress"):
            self._add(base.split(".")[0], node.lineno)
            return
        for dst in sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in self.names else base for a in node.names}):
            self._add(dst, node.lineno)

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") and not self.depth:
            self.typing = True
            for stmt in node.body:
                self.visit(stmt)
            self.typing = False
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        first = node.body[0].lineno if self.cli else node.lineno  # a CLI command's signature declares options
        self.mod.functions.append((".".join([*self.scope, node.name]), node.lineno, node.end_lineno - first + 1))  # type: ignore[operator]
        self.scope.append(node.name)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1


@cache
def scan() -> dict[str, Module]:
    """Every module of src/lmpress, by dotted name."""
    paths = sorted(PKG.rglob("*.py"))
    names = {module_name(p) for p in paths}
    mods = {}
    for path in paths:
        text = path.read_text()
        mod = Module(module_name(path), path, len(text.splitlines()))
        _Scan(mod, names, cli=mod.name.startswith("lmpress.cli")).visit(ast.parse(text, str(path)))
        mods[mod.name] = mod
    return mods


def lmpress_imports(mods: dict[str, Module], where: set[str]) -> list[Import]:
    """Imports of other lmpress modules (an import of a module that does not exist is `missing`'s)."""
    return [
        i for m in mods.values() for i in m.imports if i.ours and i.where in where and i.dst != i.src and i.dst in mods
    ]


def missing(mods: dict[str, Module]) -> list[str]:
    return [f"{i.src}:{i.line} -> {i.dst}" for m in mods.values() for i in m.imports if i.ours and i.dst not in mods]


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), run-time imports included."""
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for i in lmpress_imports(mods, {"module", "function"}):
        graph[i.src].add(i.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def floor_of(name: str) -> int | None:
    for prefix in sorted(FLOORS, key=len, reverse=True):
        if name == prefix or (prefix not in EXACT and name.startswith(prefix + ".")):
            return FLOORS[prefix]
    return None


def floor_violations(mods: dict[str, Module]) -> list[str]:
    """Imports (any kind, typing included) from a module to one on a higher floor."""
    out = []
    for i in lmpress_imports(mods, {"module", "function", "typing"}):
        src, dst = floor_of(i.src), floor_of(i.dst)
        if src is not None and dst is not None and dst > src:
            out.append(f"{i.src} (floor {src}) -> {i.dst} (floor {dst}), line {i.line}, {i.where}-level")
    return out


def optional_deps(mods: dict[str, Module]) -> dict[str, set[str]]:
    """The optional packages each module imports when it is imported (its module-level imports, transitively)."""
    direct = {n: {i.dst for i in m.imports if not i.ours and i.where == "module"} & OPTIONAL for n, m in mods.items()}
    edges: dict[str, set[str]] = {n: set() for n in mods}
    for i in lmpress_imports(mods, {"module"}):
        edges[i.src].add(i.dst)
    out: dict[str, set[str]] = {}
    for name in mods:
        seen, todo = {name}, [name]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        out[name] = set().union(*(direct[n] for n in seen))
    return out


def function_imports(mods: dict[str, Module]) -> tuple[list[Import], list[Import]]:
    """All function-level lmpress imports, and those that defer no optional dependency."""
    deps = optional_deps(mods)
    found = lmpress_imports(mods, {"function"})
    return found, [i for i in found if not deps[i.dst]]


def long_files(mods: dict[str, Module]) -> list[str]:
    return [f"{m.path.relative_to(ROOT)}: {m.lines}" for m in mods.values() if m.lines > MAX_FILE_LINES]


def long_functions(mods: dict[str, Module]) -> list[str]:
    return [
        f"{m.path.relative_to(ROOT)}:{name}: {n}"
        for m in mods.values()
        for name, _, n in m.functions
        if n > MAX_FUNCTION_LINES
    ]


def _show(i: Import) -> str:
    return f"{i.src}:{i.line} -> {i.dst}"


def test_every_extra_has_its_import_name() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dists = {re.split(r"[<>=!~\[; ]", req)[0] for extra, reqs in extras.items() if extra != "dev" for req in reqs}
    assert dists == set(EXTRA_IMPORTS)


def test_every_module_has_a_floor() -> None:
    assert [n for n in scan() if floor_of(n) is None] == []


def test_every_lmpress_import_names_a_module() -> None:
    assert missing(scan()) == []


def test_the_scan_sees_imports() -> None:
    mods = scan()
    assert len(mods) > 50
    kinds = {i.where for m in mods.values() for i in m.imports}
    assert {"module", "function"} <= kinds
    assert optional_deps(mods)["lmpress.export.onnx_runtime"] >= {"onnxruntime"}


def test_no_import_cycle() -> None:
    assert cycles(scan()) == []


def test_no_import_from_a_lower_floor_to_a_higher_one() -> None:
    assert floor_violations(scan()) == []


def test_function_level_imports_only_defer_optional_dependencies() -> None:
    assert [_show(i) for i in function_imports(scan())[1]] == []


def test_no_file_over_400_lines() -> None:
    assert long_files(scan()) == []


def test_no_function_over_80_lines() -> None:
    assert long_functions(scan()) == []


def main() -> None:
    mods = scan()
    found, unjustified = function_imports(mods)
    by_kind = {k: len(lmpress_imports(mods, {k})) for k in ("module", "function", "typing")}
    third = sum(1 for m in mods.values() for i in m.imports if not i.ours and i.where == "function")
    print(f"modules: {len(mods)}")
    print(f"lmpress imports: {by_kind['module']} module-level, {by_kind['function']} function-level, "
          f"{by_kind['typing']} typing-only; third-party imports in functions: {third}")  # fmt: skip
    statements = len({(i.src, i.line) for i in found})
    print(f"function-level lmpress imports: {len(found)} (in {statements} statements), deferring an optional "
          f"dependency: {len(found) - len(unjustified)}, not: {len(unjustified)}")  # fmt: skip
    sections = {
        "cycles": [" <-> ".join(c) for c in cycles(mods)],
        "floor violations": floor_violations(mods),
        "unjustified function-level imports": [_show(i) for i in unjustified],
        f"files over {MAX_FILE_LINES} lines": long_files(mods),
        f"functions over {MAX_FUNCTION_LINES} lines": long_functions(mods),
        "modules without a floor": [n for n in mods if floor_of(n) is None],
        "imports of modules that do not exist": missing(mods),
    }
    for title, rows in sections.items():
        print(f"{title}: {len(rows)}")
        if "-v" in sys.argv:
            for row in rows:
                print(f"  {row}")


if __name__ == "__main__":
    main()
