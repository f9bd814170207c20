"""The layers: what each part of sdmesh may import, read from the source (every import, in functions too).

models/, samplers/, engine/, inputs/   never serving, the pipeline, dev helpers or the client
inputs/, chain.py, the gateway's path  never JAX (at import time)
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
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (
                nested
                or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            )
            if not (top_level_only and inner):
                if isinstance(child, ast.Import):
                    found.update(a.name for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module:
                    found.add(child.module)
                    found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def sources(*globs: str) -> list[Path]:
    return sorted(p for g in globs for p in ROOT.glob(g))


def offending(paths: list[Path], forbidden: tuple[str, ...], **kwargs) -> list[str]:
    return [
        f"{module_name(p)} imports {m}"
        for p in paths
        for m in sorted(imports(p, **kwargs))
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    ]


def test_the_core_and_the_inputs_never_import_serving_the_pipeline_dev_or_the_client():
    core = sources("services/models/*.py", "services/samplers/*.py", "services/engine/*.py", "services/inputs/*.py")
    assert core, "no sources found"
    forbidden = ("sdmesh.services.serving", "sdmesh.services.pipeline", "sdmesh.services.dev", "sdmesh.client")
    assert offending(core, forbidden) == []


def test_the_request_layer_and_the_gateways_path_load_no_jax():
    jax_free = sources("services/inputs/*.py", "services/chain.py", "services/engine/errors.py") + [
        ROOT / "services" / "serving" / f"{name}.py"
        for name in ("gateway", "wire", "server", "batching", "metrics", "errors")
    ]
    forbidden = (
        "jax",
        "flax",
        "sdmesh.services.models",
        "sdmesh.services.samplers",
        "sdmesh.services.engine.stages",
        "sdmesh.services.engine.programs",
        "sdmesh.services.engine.denoise",
        "sdmesh.services.engine.sharding",
        "sdmesh.services.engine.distributed",
        "sdmesh.services.pipeline",
    )
    assert offending(jax_free, forbidden, top_level_only=True) == []
    assert offending([ROOT / "services" / "engine" / "stages.py"], ("jax",), top_level_only=True), (
        "the check sees imports"
    )


def test_services_never_import_the_client():
    assert offending(sources("services/**/*.py"), ("sdmesh.client",)) == []


def test_the_client_library_depends_on_the_wire_not_on_services():
    library = [ROOT / "client" / f"{name}.py" for name in ("__init__", "client", "stages", "stack", "top")]
    assert offending(library, ("sdmesh.services",)) == []


@pytest.mark.parametrize(
    "module",
    ["sdmesh.services.serving.gateway", "sdmesh.services.inputs.contract", "sdmesh.services.chain", "sdmesh.client"],
)
def test_importing_loads_no_jax(module):
    code = (
        f"import sys, {module}; assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')], '{module}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
