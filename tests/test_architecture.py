"""The layout stays one-way: no import cycle in paco_ray/ and pipelines/ (function-local imports
included), paco_ray.data never imports pipelines, the reference augmentation stays off the
training path, the commands load no torch before reading their options, and functions stay short
enough to read."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("paco_ray", "pipelines")
MAX_FUNCTION_LINES = 60
# Longer functions, each with its reason.
LONG_FUNCTIONS = {
    "paco_ray.losses.paco_loss": "one formula, kept in one place beside the docstring that states it",
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports, at any depth of its code (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:  # an attribute of a module: its module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_walker_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "paco_ray.config" in graph["paco_ray.train"]                # from .config import ...
    assert "pipelines.default_data" in graph["paco_ray.train"]         # inside a function
    assert "paco_ray.data.prepared" in graph["paco_ray.data.loaders"]  # from .prepared import ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_paco_ray_data_reads_prepared_directories_only():
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "pipelines")
                 for name, targets in graph.items() if name.startswith("paco_ray.data")}
    assert {name: t for name, t in offenders.items() if t} == {}


def test_only_the_command_line_drivers_prepare_the_default_dataset():
    graph = import_graph()
    preparing = sorted(name for name, targets in graph.items()
                       if name.startswith("paco_ray") and any(t.startswith("pipelines") for t in targets))
    assert preparing == ["paco_ray.train", "paco_ray.tune"]


def test_only_tests_and_benchmarks_use_the_reference_augmentation():
    graph = import_graph()
    assert sorted(name for name, targets in graph.items() if "paco_ray.data.reference_augment" in targets) == []
    assert "paco_ray.data.augment" in graph["paco_ray.data.reference_augment"]  # the walker sees the module


@pytest.mark.parametrize("command", ["train", "tune", "evaluate"])
def test_a_command_module_loads_no_torch_or_ray_when_imported(command):
    """``python -m paco_ray.<command> --help`` answers before the heavy modules load."""
    done = subprocess.run([sys.executable, "-c", f"import sys, paco_ray.{command}; "
                           "print(sorted(m for m in ('torch', 'ray', 'ffcv') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == "[]"


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("package", ["paco_ray"])
def test_functions_stay_short(package):
    too_long = {}
    for name, path in modules().items():
        if not name.startswith(package):
            continue
        for node in functions(path):
            qualified = f"{name}.{node.name}"
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and qualified not in LONG_FUNCTIONS:
                too_long[qualified] = length
    assert too_long == {}


def test_every_long_function_on_the_list_is_still_long():
    lengths = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
               for name, path in modules().items() for node in functions(path)}
    assert {name: lengths.get(name, 0) > MAX_FUNCTION_LINES for name in LONG_FUNCTIONS} == \
        {name: True for name in LONG_FUNCTIONS}
