"""The package's import graph (issue 29): `logs/` depends on nothing above it, and no
module imports, directly or through others, a module that imports it back. Every
import counts, also those inside functions."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "optinsight")
#: Modules `logs/` may use besides its own: leaves, which import nothing of the package
#: (the metric table, the schedule type and the sign-map codes: vocabulary shared by
#: writers, readers and the recorder).
LEAVES_FOR_LOGS = {"optinsight.metrics", "optinsight.schedule", "optinsight.signs"}


def module_name(path):
    relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")]
    parts = relative.split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports():
    """{module: {imported optinsight module}} over every .py file of the package."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                modules[module_name(os.path.join(root, name))] = os.path.join(root, name)
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level
                                                       + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]  # a submodule, or a name of `base`
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != module and target.startswith("optinsight."):
                    found.add(target)
        graph[module] = found
    return graph


GRAPH = package_imports()


def test_the_graph_is_read():
    assert "optinsight.logs.reader" in GRAPH["optinsight.logs.summary"]
    assert "optinsight.recorder" in GRAPH["optinsight.callback"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("optinsight.logs")))
def test_logs_imports_nothing_above_it(module):
    above = {m for m in GRAPH[module]
             if not m.startswith("optinsight.logs") and m not in LEAVES_FOR_LOGS}
    assert not above, f"{module} imports {sorted(above)}"


def test_leaves_import_nothing_of_the_package():
    for leaf in LEAVES_FOR_LOGS:
        assert not GRAPH[leaf], f"{leaf} imports {sorted(GRAPH[leaf])}"


def test_no_import_cycles():
    """No module reaches itself through the modules it imports (a package's
    __init__ re-exporting its modules does not count as importing them back)."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()]:
                if nxt not in seen and not (start.startswith(nxt + ".")):
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in GRAPH if m in reach(m)]
    assert not cycles, f"modules in import cycles: {sorted(cycles)}"
