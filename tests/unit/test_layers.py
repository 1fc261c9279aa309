"""Imports flow one way: each module imports only from layers below its own.

The rule is docs/architecture.md's picture, written as data: a package's rank,
and a module may import from its own package or from a package of lower rank.
Foundation modules (errors, units, addresses, config, pages, policy, stats)
form rank 0 and import among themselves. The test reads the source with ast, so it needs no
native build and catches lazy imports inside functions too.
"""
import ast
import importlib.util
import os

RANK = {
    # rank 0: the pure foundation
    "errors": 0, "units": 0, "addresses": 0, "config": 0, "pages": 0, "policy": 0,
    "stats": 0, "failpoints": 0,
    # the compiled core, imported only by native/
    "_native": 0.5,
    # rank 1: the sans-IO protocol and the one importer of the compiled core
    "protocol": 1, "native": 1,
    # rank 2: built on one of those
    "codec": 2, "vm": 2, "aio": 2,
    # rank 3: the migration engine
    "engine": 3,
    # rank 4: tools that measure before a migration
    "analysis": 4,
    # rank 5: daemon, control socket, library
    "service": 5,
    # just above: many hosts coordinated through etcd (drives daemons from outside)
    "fleet": 5.5,
    # rank 6: demo, sweep, two emulated hosts; never imported by the layers below
    "lab": 6,
    # rank 7: the command line, the front door
    "cli": 7,
    # the public facade (lazy names) and `python -m livemig`
    "__main__": 8, "__init__": 8,
}


def _package_root():
    return os.path.dirname(importlib.util.find_spec("livemig").origin)


def _modules():
    root = _package_root()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)[:-3].split(os.sep)
                yield path, rel


def _top(rel_parts):
    return rel_parts[0]


def _imports(path, rel):
    """Yield the livemig top-level package each import in *path* names."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    pkg = rel[:-1]   # the package the module lives in (relative to livemig)
    if rel[-1] == "__init__":
        pkg = rel[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + (node.module.split(".") if node.module else [])
                if not target:   # "from . import x" at the package root
                    target = [node.names[0].name]
                yield node.lineno, target[0]
            elif node.module and node.module.split(".")[0] == "livemig":
                parts = node.module.split(".")[1:] or [node.names[0].name]
                yield node.lineno, parts[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "livemig" and len(parts) > 1:
                    yield node.lineno, parts[1]


def test_every_package_has_a_rank():
    tops = {_top(rel) for _, rel in _modules()}
    assert tops <= set(RANK), f"packages without a layer: {sorted(tops - set(RANK))}"


def test_imports_only_flow_down():
    wrong = []
    for path, rel in _modules():
        me = _top(rel)
        for lineno, target in _imports(path, rel):
            if target == me:
                continue
            assert target in RANK, f"{path}:{lineno} imports unknown livemig.{target}"
            if RANK[target] >= RANK[me] and not (RANK[me] == 0 and RANK[target] == 0):
                wrong.append(f"livemig/{'/'.join(rel)}.py:{lineno}: {me} (rank {RANK[me]}) "
                             f"imports {target} (rank {RANK[target]})")
    assert not wrong, "imports that run up or sideways:\n" + "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..service.daemon import Daemon\n")
    found = list(_imports(str(bad), ["engine", "bad"]))
    assert found == [(1, "service")]
