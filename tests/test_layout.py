"""The package layout as a rule: imports flow one way, data_pipeline -> runtime -> train / export
-> serve_bench, with no import cycles, counting every import statement (inside functions too)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"data_pipeline": 0, "runtime": 1, "train": 2, "export": 2, "serve_bench": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in LAYERS for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports anywhere in its file (relative imports resolved;
    `from pkg import sub` counts as importing pkg.sub when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a project module, or an attribute path
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in LAYERS:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules)) - {name} for name, path in modules.items()}


def test_every_import_goes_to_a_lower_layer_or_the_same_package():
    bad = []
    for src, targets in import_graph().items():
        for dst in targets:
            a, b = src.split(".")[0], dst.split(".")[0]
            if a != b and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} imports {dst} ({a} is layer {LAYERS[a]}, {b} layer {LAYERS[b]})")
    assert not bad, "\n".join(bad)


def test_there_are_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level import of a higher layer is found."""
    path = REPO / "runtime" / "device.py"
    code = path.read_text() + "\n\ndef _late():\n    from serve_bench import restore  # noqa: F401\n"
    probe = tmp_path / "device.py"
    probe.write_text(code)
    assert "serve_bench.restore" in imports_of("runtime.device", probe, set(project_modules()))


def test_commands_share_one_error_wrapper():
    """Every command's main() is wrapped by data_pipeline.errors.command (one `error:` line, exit 2)."""
    missing = []
    for name, path in project_modules().items():
        text = path.read_text()
        if "def main(argv=None)" in text and "@command\ndef main(argv=None)" not in text:
            missing.append(name)
        assert 'print(f"error: ' not in text or name == "data_pipeline.errors", name
    assert not missing, missing
