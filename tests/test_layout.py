"""The package layout (docs/design.md section 4): imports run one way, modules stay small,
nothing cites a file outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mcn_compress"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
SIZE_REASON = "size:"  # a docstring line starting with this explains an exception


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> set[str]:
    """Modules of the package imported anywhere in ``tree`` (functions included), except under
    ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("mcn_compress"):
                found.update(f"{node.module}.{a.name}" for a in node.names)
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mcn_compress"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        imported = _runtime_imports(ast.parse(path.read_text()))
        graph[name] = {m for m in imported if m in paths and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, naive)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := walk(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_import_cycle_inside_the_package() -> None:
    graph = _graph()
    # the package root re-exports the public API; no module inside may import it back
    back = sorted(m for m, deps in graph.items() if "mcn_compress" in deps and m != "mcn_compress")
    assert back == [], f"modules importing the package root: {back}"
    inner = {m: deps - {"mcn_compress"} for m, deps in graph.items() if m != "mcn_compress"}
    assert _cycle(inner) is None, f"import cycle: {' -> '.join(_cycle(inner) or [])}"


LEVELS = {  # docs/design.md section 4.1: a module imports only from its level and below
    "errors": 0,
    "version": 0,
    "config": 0,
    "defaults": 0,
    "limits": 0,
    "nn": 1,
    "amp": 1,
    "module_utils": 1,
    "passes": 2,
    "info": 2,
    "models": 2,
    "hub": 2,
    "smallnets": 2,
    "data": 2,
    "idx": 2,
    "fashion_mnist": 2,
    "images": 2,
    "formats": 3,
    "storage": 3,
    "training": 4,
    "evaluate": 4,
    "calibration_data": 4,
    "profile": 5,
    "report_paths": 5,
    "plot": 5,
    "experiments": 5,
    "cli": 6,
    "__main__": 7,
}


def _part(module: str) -> str:
    """The top-level module or sub-package of ``module`` (``mcn_compress.passes.keep`` ->
    ``passes``)."""
    return module.split(".")[1]


def _upward_imports(graph: dict[str, set[str]], levels: dict[str, int]) -> list[str]:
    return sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        if module != "mcn_compress"
        for dep in deps
        if dep != "mcn_compress" and levels[_part(dep)] > levels[_part(module)]
    )


def test_imports_run_down_the_layers() -> None:
    graph = _graph()
    parts = {_part(m) for m in graph if m != "mcn_compress"}
    assert parts <= set(LEVELS), f"place these in LEVELS: {sorted(parts - set(LEVELS))}"
    assert _upward_imports(graph, LEVELS) == []
    # the CLI is the only door to printing: nothing but the entry points imports it
    users = {m for m, deps in graph.items() if any(_part_or_root(d) == "cli" for d in deps)}
    assert {_part_or_root(m) for m in users} <= {"cli", "__main__"}


def _part_or_root(module: str) -> str:
    return _part(module) if "." in module else module


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"mcn_compress.nn.a": {"mcn_compress.formats.b"}, "mcn_compress.formats.b": set()}
    assert _upward_imports(graph, LEVELS) == ["mcn_compress.nn.a -> mcn_compress.formats.b"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_and_classes_stay_small() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        reason = SIZE_REASON in (ast.get_docstring(tree) or "")
        if len(text.splitlines()) > MAX_MODULE_LINES and not reason:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_CLASS_LINES and SIZE_REASON not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{path.relative_to(ROOT)}: class {node.name} {lines} lines")
    assert too_long == []


def test_no_reference_to_files_outside_the_repository() -> None:
    outside = re.compile(r"DESIGN\.md|\.\./shared|/work/")
    files = [
        *PACKAGE.rglob("*.py"),
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "recipes").glob("*.yaml"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []
    assert (ROOT / "docs" / "design.md").is_file()


def test_links_between_the_docs_resolve() -> None:
    """Every relative Markdown link of the README and docs/ names a file of the repository."""
    link = re.compile(r"\]\(([\w./-]+\.(?:md|yaml|py|toml|png))(?:#[^)]*)?\)")
    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in link.findall(page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
