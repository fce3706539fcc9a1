"""The architecture, checked from the source: three floors, imports pointing only down, no cycles.

Every import statement of the project's modules is read from the AST, function-local ones
included (a lazy import is still a dependency):

    ground floor   sepvit_jax.core            neither JAX nor torch (torch only inside the
                                              functions that read or write a torch file)
    models         sepvit_jax (model, layers, kernels, attention, checkpoint, sharding),
                   sepvit_torch               the ground floor only; never each other, never
                                              convert; sepvit_torch never JAX
    tools          convert, sepvit_jax.train, sepvit_jax.data, benchmarks, train.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sepvit_jax", "sepvit_torch", "convert", "benchmarks")
JAX_FAMILY = ("jax", "jaxlib", "flax", "optax", "orbax", "grain")
TORCH_FAMILY = ("torch", "safetensors")
# The only function-local imports allowed in sepvit_jax, sepvit_torch and convert, and why.
LOCAL_IMPORT_REASONS = {
    "torch": "optional ([torch] extra); imported only where a torch file is read or written",
    "safetensors": "optional ([torch] extra), only for .safetensors files",
    "matplotlib": "0.3 s to import; only when a run draws its curves",
    "jax": "the data package must not load JAX in Grain's worker processes",
    "sepvit_jax.checkpoint": "JAX and Orbax: sepvit_torch.load needs them only for directories",
    "convert.verify": "torch: only `convert torch2flax --verify` runs the torch reference",
}
MAX_LOCAL_IMPORTS = 20


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    modules = {"train": ROOT / "train.py"}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            modules[_module_name(path)] = path
    return modules


MODULES = _project_modules()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, function-local?, line) of every import statement in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    local_lines = {
        sub.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for sub in ast.walk(node)
        if isinstance(sub, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            # `from package import module` depends on the module; `from module import name`
            # on the module.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        else:
            continue
        found += [(name, node.lineno in local_lines, node.lineno) for name in names]
    return found


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _floor(module: str) -> str:
    if _in(module, "sepvit_jax.core"):
        return "ground"
    if _in(module, "convert", "benchmarks", "train", "sepvit_jax.train", "sepvit_jax.data"):
        return "tools"
    return "models"


def _violations(module: str, imported: str, local: bool) -> list[str]:
    floor, problems = _floor(module), []
    if floor == "ground":
        if _in(imported, *JAX_FAMILY):
            problems.append("the ground floor imports JAX")
        if _in(imported, *TORCH_FAMILY) and not local:
            problems.append("the ground floor imports torch at module level")
        if _in(imported, *PACKAGES) and _floor(imported) != "ground":
            problems.append("the ground floor imports a higher floor")
    if _in(module, "sepvit_jax") and _in(imported, "convert", "sepvit_torch"):
        problems.append("sepvit_jax imports convert or sepvit_torch")
    if _in(module, "sepvit_torch"):
        if _in(imported, "convert", *JAX_FAMILY):
            problems.append("sepvit_torch imports convert or JAX")
        if _in(imported, "sepvit_jax") and _floor(imported) != "ground":
            problems.append("sepvit_torch imports sepvit_jax above the ground floor")
    if floor == "models" and _in(imported, *PACKAGES, "train") and _floor(imported) == "tools":
        problems.append("a model module imports a tool")
    if _in(module, "sepvit_jax.data") and _in(imported, "jax", "flax", "orbax") and not local:
        problems.append("the data package imports JAX at module level (Grain workers)")
    return problems


def test_imports_point_down():
    problems = [
        f"{module} imports {imported} (line {line}): {why}"
        for module, path in MODULES.items()
        for imported, local, line in _imports(path)
        for why in _violations(module, imported, local)
    ]
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {
        module: {imported for imported, _, _ in _imports(path) if imported in MODULES}
        for module, path in MODULES.items()
    }
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_function_local_imports_are_few_and_justified():
    local = [
        (module, imported, line)
        for module, path in MODULES.items()
        if _in(module, "sepvit_jax", "sepvit_torch", "convert")
        for imported, is_local, line in _imports(path)
        if is_local
    ]
    unjustified = [
        f"{module}:{line} imports {imported}"
        for module, imported, line in local
        if not any(_in(imported, allowed) for allowed in LOCAL_IMPORT_REASONS)
    ]
    assert not unjustified, "function-local imports without a reason:\n" + "\n".join(unjustified)
    assert len(local) < MAX_LOCAL_IMPORTS, local


@pytest.mark.parametrize(
    "module, imported, local, expected",
    [
        ("sepvit_jax.core.table", "jax.numpy", True, "ground floor imports JAX"),
        ("sepvit_jax.core.torch_io", "torch", False, "torch at module level"),
        ("sepvit_jax.core.infer", "sepvit_jax.checkpoint", True, "higher floor"),
        ("sepvit_jax.checkpoint", "convert.bridge", True, "sepvit_jax imports convert"),
        ("sepvit_torch.model", "jax", False, "sepvit_torch imports convert or JAX"),
        ("sepvit_torch.model", "sepvit_jax.model", False, "above the ground floor"),
        ("sepvit_jax.model", "sepvit_jax.train.steps", False, "a model module imports a tool"),
        ("sepvit_jax.data.pipeline", "jax", False, "Grain workers"),
    ],
)
def test_the_rules_catch_forbidden_edges(module, imported, local, expected):
    assert any(expected in why for why in _violations(module, imported, local))
