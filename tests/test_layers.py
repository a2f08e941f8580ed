"""The code's layers (README, Architecture): each module imports only from its own layer or those
below it, and no modules import each other in a cycle. Imports inside functions count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["specexec_app", "drafts", "offload"]
# Lowest first: a module may import from its own layer and those below it.
LAYERS = [
    ["specexec_app", "specexec_app.errors", "specexec_app.paths", "specexec_app.files"],
    ["specexec_app.core"],
    ["drafts", "offload"],
    ["specexec_app.config"],
    ["specexec_app.loading"],
    ["specexec_app.tools"],
    ["specexec_app.ui", "specexec_app.__main__"],
]


def layer_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > len(best[1]):
                    best = (i, p)
    assert best is not None, module
    return best[0]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports, anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_points_up_a_layer():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in graph().items() for t in targets
             if layer_of(t) > layer_of(m) and t != "specexec_app"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    # Package __init__ files are imported with any of their modules: leave the edges into them
    # out (a module importing its own package's name is not a cycle of code).
    g = {m: {t for t in ts if not (m.startswith(t + "."))} for m, ts in g.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checks_see_a_wrong_import(tmp_path):
    """The rule would catch core importing the ui (the test is not vacuous)."""
    assert layer_of("specexec_app.core.engine") < layer_of("specexec_app.ui.cli")
    fake = tmp_path / "engine.py"
    fake.write_text("from specexec_app.ui.cli import app\n")
    got = imports("specexec_app.core.engine", fake, set(modules()))
    assert "specexec_app.ui.cli" in got
