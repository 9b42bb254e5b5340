"""The package's structure (docs/architecture.md): imports go down the layers and never in a
circle, the subpackages load on first use, the tree passes the linter, and `msdiff bench --list`
names every benchmark script."""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "msdiff_fast"

# Lowest first: a module may import from its own layer and the layers below it, never above.
# The package itself (msdiff_fast/__init__.py) is the public facade over ops, sde and samplers.
LAYERS = (
    ("base", ("msdiff_fast.errors", "msdiff_fast.checks", "msdiff_fast.distributed")),
    ("kernels", ("msdiff_fast.ops", "msdiff_fast._C", "msdiff_fast._C_cuda")),
    ("processes", ("msdiff_fast.sde",)),
    (
        "solvers and networks",
        ("msdiff_fast", "msdiff_fast.samplers", "msdiff_fast.models", "msdiff_fast.tiling", "msdiff_fast.testing"),
    ),
    ("estimators", ("msdiff_fast.estimators",)),
    ("training and evaluation", ("msdiff_fast.training", "msdiff_fast.metrics", "msdiff_fast.inception", "msdiff_fast.compat")),
    ("application", ("msdiff_fast.restoration", "msdiff_fast.reports", "msdiff_fast.outputs")),
    ("demo", ("msdiff_fast.demo",)),
    ("command", ("msdiff_fast.cli", "msdiff_fast.__main__")),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports anywhere in its file (functions included):
    ``from x import y`` counts as importing x.y when that is a module, else x."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix that names ``module``'s layer."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module}: in no layer of LAYERS; add it there and to docs/architecture.md")
    return best


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_the_checker_sees_relative_imports_and_cycles():
    graph = import_graph()
    assert "msdiff_fast.training.checkpoint" in graph["msdiff_fast.training.data"]
    assert "msdiff_fast.ops.reference" in graph["msdiff_fast.ops.mr_step"]  # from . import reference
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_subpackages_load_on_first_use():
    code = (
        "import sys, msdiff_fast\n"
        "heavy = [m for m in ('msdiff_fast.models', 'msdiff_fast.estimators', 'msdiff_fast.training', 'msdiff_fast.metrics') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "net = msdiff_fast.models.unet_preset('tiny', 'cmde', image_channels=1, cond_channels=1, image_size=16)\n"
        "assert msdiff_fast.estimators.CMDE and msdiff_fast.training.TrainConfig and msdiff_fast.compat and msdiff_fast.metrics.psnr\n"
        "assert 'models' in dir(msdiff_fast)\n"
        "try:\n    msdiff_fast.no_such_module\nexcept AttributeError as err:\n    assert 'no_such_module' in str(err)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_bench_list_names_every_benchmark_script(capsys):
    from msdiff_fast.cli import main

    scripts = {path.stem for path in (ROOT / "benchmarks").glob("*.py") if '__name__ == "__main__"' in path.read_text()}
    assert len(scripts) >= 8
    assert main(["bench", "--list"]) == 0
    listed = set(capsys.readouterr().out.split())
    assert listed == {name[len("benchmark_") :] if name.startswith("benchmark_") else name for name in scripts}


def test_the_tree_passes_the_linter_and_the_formatter():
    for check in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([sys.executable, "-m", "ruff", *check, "--no-cache"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, (
            f"ruff {' '.join(check)} (ruff comes with pip install -e .[test]):\n{result.stdout}{result.stderr}"
        )
