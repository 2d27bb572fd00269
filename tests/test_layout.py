"""The import layering of docs/layout.md, drawn from the code with `ast`: every arrow points down, no circle,
no method file imports another. Adding an upward import (a method reaching into callbacks/, the floor into
anything above it) fails here with the file and the import named."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what each package may import besides itself (a package above sees everything below it)
ALLOWED = {
    "embedding_core": set(),
    "datamodules": {"embedding_core"},
    "lightning_modules": {"embedding_core"},
    "callbacks": {"embedding_core", "datamodules", "lightning_modules"},
    "experiments": {"embedding_core", "datamodules", "lightning_modules", "callbacks"},
}
METHODS = {f"lightning_modules.{name}" for name in ("isif", "umm", "eir", "tac_ccl", "san", "roul", "snowball",
                                                    "lmcs")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def suite_modules() -> dict[str, Path]:
    return {module_name(path): path for package in ALLOWED for path in (ROOT / package).rglob("*.py")}


def imports(path: Path, known: dict[str, Path], package: str = "") -> set[str]:
    """The suite modules a file imports anywhere in it (function-level imports included); `from pkg import sub`
    names the submodule when `sub` is one; a relative import is resolved against `package`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = suite_modules()
    return {name: imports(path, known, name if path.name == "__init__.py" else name.rpartition(".")[0]) - {name}
            for name, path in known.items()}


def test_every_import_points_down_the_layers():
    upward = [f"{source} imports {target}" for source, targets in import_graph().items() for target in targets
              if (top := target.split(".")[0]) != source.split(".")[0] and top not in ALLOWED[source.split(".")[0]]]
    assert not upward, "imports against docs/layout.md's layering:\n" + "\n".join(sorted(upward))


def test_no_method_file_imports_another_method_and_no_shared_part_imports_a_method():
    graph = import_graph()
    crossing = [f"{source} imports {target}" for source, targets in graph.items() if source.startswith(
        "lightning_modules.") for target in targets & METHODS]
    assert not crossing, "a method's shared pieces belong in losses/, a shared part or embedding_core:\n" + \
        "\n".join(sorted(crossing))


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above are not vacuous: the graph holds the arrows the layering allows, and a planted
    upward import is found."""
    graph = import_graph()
    assert "embedding_core.search" in graph["embedding_core.metrics"]
    assert "lightning_modules.losses.instance" in graph["lightning_modules.umm"]
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from callbacks.evaluation import EmbeddingEvaluator\n")
    assert imports(planted, suite_modules()) == {"callbacks.evaluation"}
    planted.write_text("from ..callbacks import evaluation\nfrom . import umm\n")
    assert imports(planted, suite_modules(), "lightning_modules") == {"callbacks", "callbacks.evaluation",
                                                                       "lightning_modules", "lightning_modules.umm"}
