"""The layers: what each part of sdmesh may import, read from the source (every import, in functions too).

models/, samplers/, engine/, inputs/   never serving, the pipeline, dev helpers or the client
inputs/, chain.py, the gateway's path  never JAX (at import time), the HTTP front included
services/                              never the client (the CLI is the one place that reaches both)
the client library                     never services (only the wire: sdmesh.v1)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"services": "sdmesh.services", "client": "sdmesh.client"}


def module_name(path: Path) -> str:
    top, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [FOLDERS[top], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Modules `path` imports; with top_level_only, not those inside functions or under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found: set[str] = set()

    def absolute(node: ast.ImportFrom) -> str:  # `from .x import y` in sdmesh.services.a → sdmesh.services.a.x
        base = package[: len(package) - node.level + 1] if node.level else []
        return ".".join([*base, *([node.module] if node.module else [])])

    def record(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node)  # `from p import m` counts as p.m: `from engine import errors` is engine.errors
            found.update(f"{module}.{a.name}" for a in node.names)

    def visit(nodes: list[ast.AST], nested: bool) -> None:
        for node in nodes:
            if not (top_level_only and nested):
                record(node)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.body, True)  # for the type checker only; its `else:` runs
                visit(node.orelse, nested)
            else:
                inner = nested or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                visit(list(ast.iter_child_nodes(node)), inner)

    visit(tree.body, False)
    return found


def sources(*globs: str) -> list[Path]:
    return sorted(p for g in globs for p in ROOT.glob(g))


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def offending(paths: list[Path], forbidden: tuple[str, ...], allowed: tuple[str, ...] = (), **kwargs) -> list[str]:
    """`module imports name` for each import of `paths` inside a forbidden package and not inside an allowed one."""
    return [
        f"{module_name(p)} imports {m}"
        for p in paths
        for m in sorted(imports(p, **kwargs))
        if within(m, forbidden) and not within(m, allowed)
    ]


def test_the_core_and_the_inputs_never_import_serving_the_pipeline_dev_or_the_client():
    core = sources(
        "services/models/**/*.py", "services/samplers/**/*.py", "services/engine/**/*.py", "services/inputs/**/*.py"
    )
    assert core, "no sources found"
    forbidden = ("sdmesh.services.serving", "sdmesh.services.pipeline", "sdmesh.services.dev", "sdmesh.client")
    assert offending(core, forbidden) == []


def test_the_request_layer_and_the_gateways_path_load_no_jax():
    jax_free = sources(
        "services/inputs/**/*.py",
        "services/chain.py",
        "services/engine/errors.py",
        "services/checkpoints/weights.py",
        "services/checkpoints/lora.py",  # adapters are read where they are served, the gateway's path included
        "services/checkpoints/embeddings.py",
        "services/http/*.py",  # the HTTP front runs in the gateway's process
    ) + [
        ROOT / "services" / "serving" / f"{name}.py"
        for name in ("gateway", "wire", "server", "batching", "metrics", "errors")
    ]
    forbidden = (
        "jax",
        "flax",
        "sdmesh.services.models",
        "sdmesh.services.samplers",
        "sdmesh.services.engine",
        "sdmesh.services.pipeline",
    )
    allowed = ("sdmesh.services.engine.errors",)  # the engine's exceptions, no JAX (the stage server raises them)
    assert offending(jax_free, forbidden, allowed, top_level_only=True) == []
    assert offending([ROOT / "services" / "engine" / "stages.py"], ("jax",), top_level_only=True), (
        "the check sees imports"
    )


def test_the_check_sees_imports_in_functions_and_leaves_out_type_checking_ones_when_asked():
    server = ROOT / "services" / "serving" / "server.py"
    everything, at_import = imports(server), imports(server, top_level_only=True)
    assert "sdmesh.services.engine.errors.FollowerLost" in at_import
    assert "sdmesh.services.engine.distributed" in everything - at_import  # inside a function
    assert "sdmesh.services.engine.programs.Programs" in everything - at_import  # under `if TYPE_CHECKING:`


def test_services_never_import_the_client():
    assert offending(sources("services/**/*.py"), ("sdmesh.client",)) == []


def test_the_client_library_depends_on_the_wire_not_on_services():
    library = [ROOT / "client" / f"{name}.py" for name in ("__init__", "client", "stages", "stack", "top")]
    assert offending(library, ("sdmesh.services",)) == []


@pytest.mark.processes  # a fresh interpreter per module
@pytest.mark.parametrize(
    "module",
    [
        "sdmesh.services.serving.gateway",
        "sdmesh.services.http.app",
        "sdmesh.services.inputs.contract",
        "sdmesh.services.chain",
        "sdmesh.client",
    ],
)
def test_importing_loads_no_jax(module):
    code = (
        f"import sys, {module}; assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')], '{module}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
