"""The package layout: one folder per technique, imports that point only downwards, small functions.

Every import of every file is read, those inside functions included: a function-local import of a lightning_accel
module is how a cycle hides, so there is none. Cyclomatic complexity is radon's (the figure reviews quote), at most
20 per function.
"""

import ast
from pathlib import Path

from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_accel"

#: The layers, lowest first. A module may import its own package and any package of a lower layer; packages of
#: one layer never import each other.
LAYERS = [
    {"_core"},
    {"export"},
    {"precision", "pruning", "quantization", "distillation"},
    {"deploy"},
    {"report"},
    {"cli"},
    {"__init__", "__main__"},
]


def _package_of(module: str) -> str:
    """``lightning_accel.pruning.slim`` -> ``pruning``; the package's own ``__init__`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(package: str) -> int:
    return next(index for index, layer in enumerate(LAYERS) if package in layer)


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importing file, imported lightning_accel module, inside a function, line) for every import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        local = {id(child) for function in functions for child in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lightning_"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("lightning_accel")]
            else:
                continue
            for name in names:
                if name == "lightning_accel" or name.startswith("lightning_accel."):
                    found.append((str(relative), name, id(node) in local, node.lineno))
    return found


def _module_name(relative: str) -> str:
    name = relative[: -len(".py")].replace("/", ".")
    return name.removesuffix(".__init__")


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    known = set().union(*LAYERS)
    assert packages | modules <= known, f"not in LAYERS: {sorted((packages | modules) - known)}"


def test_no_lightning_accel_module_is_imported_inside_a_function():
    local = [f"{path}:{line} imports {name}" for path, name, inside, line in _imports() if inside]
    assert not local, "\n".join(local)


def test_imports_point_only_down():
    wrong = []
    for path, name, _, line in _imports():
        source, target = _package_of(_module_name(path)), _package_of(name)
        if source == target:
            continue
        if _layer(target) >= _layer(source):
            wrong.append(f"{path}:{line}: {source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(wrong)


MAX_COMPLEXITY = 20
MAX_MODULE_LINES = 400


def test_no_module_is_too_long():
    long_ones = [
        f"{path.relative_to(PACKAGE)} ({lines} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long_ones, f"over {MAX_MODULE_LINES} lines: " + ", ".join(long_ones)


def test_no_function_is_too_complex():
    # Radon counts every branch and boolean operator; build_artifacts was 59 and find_channel_groups 55.
    complex_ones = [
        f"{path.relative_to(PACKAGE)}:{block.lineno} {block.fullname} ({block.complexity})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for block in cc_visit(path.read_text())
        if block.complexity > MAX_COMPLEXITY
    ]
    assert not complex_ones, "\n".join(complex_ones)


def test_the_complexity_check_sees_a_complex_function():
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(MAX_COMPLEXITY + 1))
    (block,) = cc_visit(f"def f(x):\n{branches}    return -1\n")
    assert block.complexity > MAX_COMPLEXITY


def test_the_layer_test_reads_function_local_imports():
    # The test above cannot pass by not seeing: a function-local import in a sample is found.
    sample = "def f():\n    from lightning_accel.deploy import stage\n"
    tree = ast.parse(sample)
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    inside = {id(child) for function in functions for child in ast.walk(function)}
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imports and all(id(n) in inside for n in imports)
