"""The package's layers (core < tasks < routing < engine < runtime < serving) import only downward, core
imports no serving or cluster library, and no modules import each other in a circle. Every import
counts: at module level, inside functions, and under `if TYPE_CHECKING:`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "specrouter"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imported(name: str) -> set[str]:
    """Every module a module imports (absolute names; for `from X import Y`, X.Y where it is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return out


IMPORTS = {name: imported(name) for name in MODULES}

# (layer, forbidden imports: a package prefix or a top-level library)
RULES = [
    ("specrouter.core", ["ray", "grpc", "fastapi", "starlette", "httpx", "uvicorn",
                         "specrouter.tasks", "specrouter.routing", "specrouter.engine", "specrouter.runtime",
                         "specrouter.serving"]),
    ("specrouter.tasks", ["ray", "grpc", "specrouter.routing", "specrouter.engine", "specrouter.runtime", "specrouter.serving"]),
    ("specrouter.routing", ["specrouter.engine", "specrouter.runtime", "specrouter.serving"]),
    ("specrouter.engine", ["specrouter.runtime", "specrouter.serving"]),
    ("specrouter.runtime", ["specrouter.serving"]),
]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_package_has_modules_to_check():
    assert {"specrouter.core.chain", "specrouter.routing.router", "specrouter.engine.loop"} <= set(MODULES)


@pytest.mark.parametrize("layer, forbidden", RULES, ids=[layer for layer, _ in RULES])
def test_a_layer_imports_only_the_layers_below_it(layer, forbidden):
    bad = sorted(f"{name} imports {target}" for name, targets in IMPORTS.items() if within(name, layer)
                 for target in targets if any(within(target, f) for f in forbidden))
    assert not bad, "\n".join(bad)


def test_no_modules_import_each_other_in_a_circle():
    graph = {name: sorted(t for t in targets if t in MODULES and t != name) for name, targets in IMPORTS.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def cycle_from(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in graph[name]:
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = cycle_from(target)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = cycle_from(name)
            assert found is None, "import circle: " + " -> ".join(found)


def loaded_in_a_fresh_interpreter(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of `packages` (a package, or any module below it) that importing `modules` loads
    in a new Python process."""
    import subprocess
    import sys

    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {packages!r}))))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_the_serving_face_and_the_actor_definitions_load_without_torch():
    """The CLI driver and the HTTP/gRPC replica import these and never run a model: torch and
    transformers (about 250 MB resident each process) stay out of them."""
    modules = ["specrouter.cli", "specrouter.serving.serve", "specrouter.serving.server", "specrouter.serving.http",
               "specrouter.runtime.actors", "specrouter.runtime.grpc_server"]
    assert loaded_in_a_fresh_interpreter(modules, ("torch", "transformers")) == []


def test_a_model_process_loads_no_transformers_modeling_code():
    """Router and worker actors import the engine, the model store and both backends; transformers'
    modeling stack (its model classes, sympy, scipy: about 120 MB resident) loads only when a torch
    model does."""
    modules = ["specrouter.runtime.actors", "specrouter.runtime.dataplane", "specrouter.core.store", "specrouter.core.model",
               "specrouter.core.llamacpp", "specrouter.engine.engine", "specrouter.engine.batch_server"]
    assert loaded_in_a_fresh_interpreter(modules, ("transformers.models", "sympy", "scipy")) == []
