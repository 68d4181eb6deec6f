"""The house: ava.py needs only torch and einops, the project's modules import each other without a
cycle (each imports only modules below it), and no module but ava.py outgrows a few hundred lines."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_rm.py", "train_direct.py", "train_ppo.py", "demo.py"]


def project_modules() -> dict[str, Path]:
    """Module name -> file, for ava.py, the scripts and the avalib package."""
    found = {"ava": ROOT / "ava.py", **{name[:-3]: ROOT / name for name in SCRIPTS}}
    found.update({f"avalib.{p.stem}": p for p in sorted((ROOT / "avalib").glob("*.py")) if p.stem != "__init__"})
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "avalib":  # from avalib import data, models
                found |= {f"avalib.{alias.name}" for alias in node.names if f"avalib.{alias.name}" in known}
            elif node.module in known:  # from avalib.cli import arg
                found.add(node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    modules = project_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert graph["ava"] == set(), f"ava.py imports project modules: {graph['ava']}"
    assert not any(name in graph[m] for m in graph if m.startswith("avalib.") for name in SCRIPTS), \
        "a module of the package imports a script"


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_ava_needs_only_the_standard_library_torch_and_einops():
    """Everything `import ava` loads beyond what `import torch, einops` loads is standard library."""
    probe = ("import json, sys; import torch, einops; before = set(sys.modules); import ava; "
             "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    extra = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True,
                                      text=True).stdout)
    foreign = [m for m in extra if m not in sys.stdlib_module_names and m != "ava"]
    assert foreign == [], f"import ava pulls in {foreign}"


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_every_module_is_a_small_room(name):
    """ava.py is the algorithm in one file (at most 650 lines); every other module at most ~400."""
    lines = len(project_modules()[name].read_text().splitlines())
    assert lines <= (650 if name == "ava" else 420), f"{name}: {lines} lines"
