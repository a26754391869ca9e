"""Each stage's code deps in dvc.yaml are exactly its script's import closure over the project's modules.

DVC reruns a stage only when a listed dep changes, so a module a stage imports (directly or through another
module) but does not list leaves stale results after an edit, and a listed module it never imports reruns it for
nothing. The closure is computed statically from the source (ast), not by importing: every `import`/`from ...
import` anywhere in a module counts (a function-level import runs when the function does), except under
`if TYPE_CHECKING:`.

Rules the test enforces, per stage:
- the entry point is the `python <script>.py` or `python -m <module>` in the stage's `cmd`;
- every project module in the closure is a dep, except an inert package `__init__.py` (empty or docstring only):
  it runs but can change nothing, so listing it is allowed, not required;
- no project code outside the closure is a dep. A directory dep stands for every `.py` file under it, so
  `alpaca_qlora/training` is accepted only where the stage imports every module inside it; listing the module
  files themselves is preferred (an edit to a module the stage does not use then reruns nothing).
"""
from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from support import ROOT


def _module_file(name: str, search: list[Path]) -> Path | None:
    """The file a dotted module name loads from, first match on `search` (the script's directory, the root)."""
    parts = name.split(".")
    for base in search:
        for candidate in (base.joinpath(*parts, "__init__.py"), base.joinpath(*parts).with_suffix(".py")):
            if candidate.is_file():
                return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imported for annotations only, never at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported_names(path: Path, module: str) -> set[str]:
    """Dotted names a module's imports may load: `from p import x` may load the module p.x, so both are given."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".") if package else []
                if node.level - 1 > len(anchor):
                    raise AssertionError(f"{path}: relative import beyond the top-level package")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)  # importlib.import_module("alpaca_qlora.x")
    return {name for name in names if name}


def import_closure(entry: Path, root: Path) -> set[Path]:
    """The project files that running `entry` can execute: itself, what it imports, transitively.

    An import of `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first, so parent packages are included.
    Names that resolve to no file under `root` (or beside the script) are third-party and ignored.
    """
    search = [entry.parent, root]
    seen: set[Path] = set()
    queue = [entry]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        module = _module_name(path, root)
        for name in _imported_names(path, module):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:depth]), search)
                if found is None:
                    break
                if root in found.parents:
                    queue.append(found)
    return seen


def is_inert_init(path: Path) -> bool:
    """An `__init__.py` with nothing but a docstring: it runs, but can change no result."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def entry_point(cmd: str, root: Path) -> Path:
    words = shlex.split(cmd)
    if len(words) < 2 or not words[0].startswith("python"):
        raise AssertionError(f"cmd {cmd!r} is not `python <script>` or `python -m <module>`")
    if words[1] == "-m":
        found = _module_file(words[2], [root])
        if found is None:
            raise AssertionError(f"cmd {cmd!r}: module {words[2]} not found under {root}")
        return found
    script = root / words[1]
    if not script.is_file():
        raise AssertionError(f"cmd {cmd!r}: {words[1]} is not a file")
    return script


def code_deps(deps: list, root: Path) -> set[Path]:
    """The .py files a stage's deps name; a directory stands for every .py under it (data directories have none)."""
    files: set[Path] = set()
    for dep in deps:
        path = root / (dep if isinstance(dep, str) else next(iter(dep)))
        if path.suffix == ".py":
            files.add(path)
        elif path.is_dir():
            files.update(path.rglob("*.py"))
    return {path for path in files if "__pycache__" not in path.parts}


def stage_dep_problems(dvc_file: Path, root: Path) -> dict[str, list[str]]:
    """Per stage, what its deps miss or list in excess, as readable lines; empty when every stage is exact."""
    stages = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["stages"]
    problems: dict[str, list[str]] = {}
    for name, stage in stages.items():
        if "foreach" in stage or "matrix" in stage:
            raise AssertionError(f"stage {name}: foreach/matrix stages are not supported by this check")
        commands = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        closure: set[Path] = set()
        for cmd in commands:
            closure |= import_closure(entry_point(cmd, root), root)
        listed = code_deps(stage.get("deps", []), root)
        lines = [f"missing dep {path.relative_to(root)} (imported)" for path in sorted(closure - listed)
                 if not is_inert_init(path)]
        lines += [f"extra dep {path.relative_to(root)} (not imported)" for path in sorted(listed - closure)]
        if lines:
            problems[name] = lines
    return problems


def test_every_stage_lists_exactly_the_project_code_it_imports():
    problems = stage_dep_problems(ROOT / "dvc.yaml", ROOT)
    assert not problems, "dvc.yaml deps differ from the stages' import closures:\n" + "\n".join(
        f"  {stage}: {line}" for stage, lines in problems.items() for line in lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    """A package with a subpackage, relative imports, a type-only import and a lazy import."""
    _write(tmp_path / "pkg" / "__init__.py", '"""Docstring only."""\n')
    _write(tmp_path / "pkg" / "core.py", "import json\n")
    _write(tmp_path / "pkg" / "unused.py", "")
    _write(tmp_path / "pkg" / "typed.py", "")
    _write(tmp_path / "pkg" / "sub" / "__init__.py", "from .inner import thing\n")
    _write(tmp_path / "pkg" / "sub" / "inner.py", "from ..core import json\nthing = 1\n")
    _write(tmp_path / "pkg" / "sub" / "lazy.py", "")
    _write(tmp_path / "pkg" / "tools.py",
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typed\n"
           "def later():\n    from pkg.sub import lazy\n")
    _write(tmp_path / "stages" / "one.py", "import numpy\nfrom pkg import sub\nimport pkg.tools\n")
    return tmp_path


def test_closure_follows_subpackages_relative_and_lazy_imports_but_not_type_only(tiny_project):
    closure = import_closure(tiny_project / "stages" / "one.py", tiny_project)
    assert {str(path.relative_to(tiny_project)) for path in closure} == {
        "stages/one.py", "pkg/__init__.py", "pkg/tools.py", "pkg/core.py",
        "pkg/sub/__init__.py", "pkg/sub/inner.py", "pkg/sub/lazy.py"}


def _dvc_yaml(root: Path, deps: list[str]) -> Path:
    path = root / "dvc.yaml"
    path.write_text(yaml.safe_dump({"stages": {"one": {"cmd": "python stages/one.py", "deps": deps}}}))
    return path


EXACT = ["stages/one.py", "pkg/tools.py", "pkg/core.py", "pkg/sub/__init__.py", "pkg/sub/inner.py",
         "pkg/sub/lazy.py", "data/input.jsonl"]


def test_exact_deps_pass_and_an_inert_init_is_optional(tiny_project):
    assert stage_dep_problems(_dvc_yaml(tiny_project, EXACT), tiny_project) == {}
    assert stage_dep_problems(_dvc_yaml(tiny_project, [*EXACT, "pkg/__init__.py"]), tiny_project) == {}


def test_missing_and_extra_modules_are_reported(tiny_project):
    deps = [dep for dep in EXACT if dep != "pkg/sub/inner.py"] + ["pkg/unused.py"]
    assert stage_dep_problems(_dvc_yaml(tiny_project, deps), tiny_project) == {
        "one": ["missing dep pkg/sub/inner.py (imported)", "extra dep pkg/unused.py (not imported)"]}


def test_a_directory_dep_covers_its_modules_only_if_all_are_imported(tiny_project):
    subpackage = ["stages/one.py", "pkg/tools.py", "pkg/core.py", "pkg/sub"]
    assert stage_dep_problems(_dvc_yaml(tiny_project, subpackage), tiny_project) == {}
    whole = ["stages/one.py", "pkg"]
    assert stage_dep_problems(_dvc_yaml(tiny_project, whole), tiny_project) == {
        "one": ["extra dep pkg/typed.py (not imported)", "extra dep pkg/unused.py (not imported)"]}
