"""The layout is the architecture, measured: the import graph of marval_jax/ (and configs/) only points downward
through the layer table below; no source file over 700 lines; no function over 80 lines outside tests.

The graph is read with `ast` (no imports run): module-level and function-level imports alike, relative imports
resolved, and `from package import name` counted as an import of the submodule `package.name` where one exists.
"""
import ast
import pathlib

import pytest
from unittest.mock import ANY

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80

# Module (or package prefix) -> layer. A module's layer is that of its longest listed prefix; an import may point to
# the same layer or a lower one, never a higher one.
LAYERS = {
    # L0: pure utilities with no project dependencies.
    "marval_jax": 0, "marval_jax.user_errors": 0, "marval_jax.numerics": 0, "marval_jax.package_files": 0,
    "marval_jax.tree_paths": 0,
    # Pallas kernels: plain functions over arrays, below the models that select them (models/transformer.py).
    "marval_jax.kernels": 0,
    # L1: building blocks: modules, the diffusion chain, meshes and shardings, input pipelines and tokenizers.
    "marval_jax.models": 1, "marval_jax.diffusion": 1, "marval_jax.parallel": 1, "marval_jax.data": 1,
    # L2: what is built from the blocks: checkpoints and converters, samplers, evaluation metrics.
    "marval_jax.checkpoints": 2, "marval_jax.sampling": 2, "marval_jax.evaluation": 2,
    # L3: objectives and rewards.
    "marval_jax.losses": 3, "marval_jax.rewards": 3,
    # L4: train steps, tasks and the loop.
    "marval_jax.train": 4,
    # L5: the top-level configs package (may import marval_jax; library code must not import configs).
    "configs": 5,
    # L6: programs, the product's entry points: main (every --mode), the programs wing (sample, evaluate, demo, the
    # pipeline driver, the shipped models' loader) and the config checks main runs first.
    "marval_jax.main": 6, "marval_jax.programs": 6, "marval_jax.config_checks": 6,
    # L7: tools and benchmarks, beside the programs at the top, one step above them so that nothing in the product
    # (programs included) imports a tool.
    "marval_jax.tools": 7, "marval_jax.benchmarks": 7,
}

# Upward imports that remain today, (importer, imported module). An entry that no longer occurs fails the test as
# well, so this list can only shrink with the code.
PENDING: set = set()

# Functions over MAX_FUNCTION_LINES that remain today, (file, qualified name); same rule: must still occur.
PENDING_LONG_FUNCTIONS: set = set()


def _sources(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path, source: str):
    """(imported module, line) for every import in the file that names a project module, at any depth."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            names = [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base, node.lineno)
                     for alias in node.names]
        else:
            continue
        yield from ((name, line) for name, line in names if _layer(name) is not None)


def _layer(module: str):
    """The layer of the longest LAYERS prefix of `module` (None: not a project module)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def upward_imports(sources):
    """{(importer, imported): 'file:line'} for every import from a lower layer to a higher one; sources: {path: text}."""
    found = {}
    for path, source in sources.items():
        importer = _module_name(path)
        assert _layer(importer) is not None, f"{importer} is in no layer: add it to LAYERS in {__file__}"
        for imported, line in _imports(path, source):
            if _layer(imported) > _layer(importer):
                found.setdefault((importer, imported), f"{path.relative_to(ROOT)}:{line}")
    return found


def long_functions(folders=("marval_jax", "configs", "launch")):
    """{(file, qualified name): lines} for every function or method over MAX_FUNCTION_LINES (nested ones included)."""
    found = {}

    def visit(node, prefix, rel):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES:
                    found[(rel, name)] = child.end_lineno - child.lineno + 1
                visit(child, name + ".", rel)
            else:
                visit(child, prefix, rel)

    for path in _sources(*folders):
        visit(ast.parse(path.read_text(), str(path)), "", str(path.relative_to(ROOT)))
    return found


def test_imports_point_downward():
    found = upward_imports({path: path.read_text() for path in _sources("marval_jax", "configs")})
    new = {edge: where for edge, where in found.items() if edge not in PENDING}
    assert not new, "imports from a lower layer to a higher one (move the code down or the importer up):\n" + \
        "\n".join(f"  {where}: {a} (L{_layer(a)}) imports {b} (L{_layer(b)})" for (a, b), where in sorted(new.items()))
    gone = PENDING - set(found)
    assert not gone, f"PENDING entries that no longer occur (remove them from {__file__}): {sorted(gone)}"


def test_no_source_file_over_700_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources("marval_jax", "configs")
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by job): {long}"


def test_no_function_over_80_lines():
    found = long_functions()
    new = {k: n for k, n in found.items() if k not in PENDING_LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines outside tests (split them): {new}"
    gone = PENDING_LONG_FUNCTIONS - set(found)
    assert not gone, f"PENDING_LONG_FUNCTIONS entries that no longer occur (remove them from {__file__}): {sorted(gone)}"


@pytest.mark.parametrize("source, imported", [
    ("from marval_jax.train import loop\n", "marval_jax.train.loop"),      # `from package import submodule`
    ("from ..losses.gsim import GSIMSettings\n", "marval_jax.losses.gsim"),  # relative, against the importer's package
    ("def f():\n    import configs.marval\n", "configs.marval"),           # function-level
    ("from . import mar\nfrom marval_jax.parallel import mesh\nimport numpy\n", None),  # same layer, lower, external
])
def test_the_scan_sees_every_import_form(source, imported):
    """A module of models/ (L1) importing in each form the scan must resolve: upward ones are reported, others not."""
    probe = ROOT / "marval_jax" / "models" / "probe.py"
    found = upward_imports({probe: source})
    assert found == ({} if imported is None else {("marval_jax.models.probe", imported): ANY})


def test_sampler_spec_is_built_in_one_place():
    """Every SamplerSpec comes from sampling/from_config.py (`sampler_from_config` for a config's roles,
    `sampler_spec` for flag- or loss-driven samplers), where its values are checked."""
    sites = [f"{path.relative_to(ROOT)}:{i}" for path in _sources("marval_jax", "configs")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if "SamplerSpec(" in line and not line.lstrip().startswith("class SamplerSpec")]
    assert len(sites) == 1 and sites[0].startswith("marval_jax/sampling/from_config.py:"), sites
