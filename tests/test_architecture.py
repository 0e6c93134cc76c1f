"""The layout rules of docs/ARCHITECTURE.md, checked on the source: no import cycles (imports
inside functions count), no competition names compared outside competitions/, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

from kaggle_seg.competitions import COMPETITIONS

PACKAGE = Path(__file__).resolve().parents[1] / "kaggle_seg"
MAX_LINES = 500
LONG_MODULES = {"data/rle.py"}  # the numba kernels, one per order and dtype
# The augmentation preset "lgg" shares the competition's name; configs choose it by name.
NAME_NOT_A_COMPETITION = {("transforms.py", "lgg")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the kaggle_seg modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_kaggle_seg_has_no_import_cycles():
    graph = import_graph(_modules())
    assert "kaggle_seg.competitions.base" in graph["kaggle_seg.competitions.dsb2018"]
    assert find_cycle(graph) is None


def _competition_name_uses(path: Path) -> list[tuple[str, int, str]]:
    """`x == "uwmgi"`, `x in ("dsb2018", ...)` and `{"lgg": ...}` keys: lines where a competition
    name drives behaviour."""
    names = set(COMPETITIONS)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literals: list[ast.AST] = []
        if isinstance(node, ast.Compare):
            literals = [node.left, *node.comparators]
            for container in node.comparators:
                if isinstance(container, ast.Tuple | ast.List | ast.Set):
                    literals += container.elts
        elif isinstance(node, ast.Dict):
            literals = [key for key in node.keys if key is not None]
        for literal in literals:
            if isinstance(literal, ast.Constant) and literal.value in names:
                found.append((path.name, node.lineno, literal.value))
    return found


def test_no_competition_name_is_compared_outside_competitions():
    uses = []
    for path in PACKAGE.rglob("*.py"):
        if "competitions" not in path.relative_to(PACKAGE).parts:
            uses += _competition_name_uses(path)
    assert [u for u in uses if (u[0], u[2]) not in NAME_NOT_A_COMPETITION] == []


def test_the_name_check_sees_a_comparison(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('if name == "uwmgi":\n    pass\nORDER = {"dsb2018": "F"}\n')
    found = _competition_name_uses(sample)
    assert found == [("sample.py", 1, "uwmgi"), ("sample.py", 3, "dsb2018")]


def test_modules_stay_small():
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= LONG_MODULES, long
