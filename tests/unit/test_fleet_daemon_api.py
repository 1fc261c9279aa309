"""The fleet layer and shutdown's drain drive a daemon only through its
public API (``Daemon.migrate_vm``, ``measure_dirty_rate``, ``stop_vm``,
``vms``, ...): no ``daemon._private`` call, which would tie them to the
control commands' internals."""
import ast
import importlib.util
import os

from livemig.service.daemon import Daemon


def _sources():
    root = os.path.dirname(importlib.util.find_spec("livemig").origin)
    fleet = os.path.join(root, "fleet")
    yield from (os.path.join(fleet, f) for f in sorted(os.listdir(fleet)) if f.endswith(".py"))
    yield os.path.join(root, "service", "shutdown.py")


def _daemon_attributes(path):
    """(line, attribute) of every ``<...>daemon.<attribute>`` in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else \
                base.attr if isinstance(base, ast.Attribute) else None
            if name == "daemon":
                yield node.lineno, node.attr


def test_no_private_daemon_calls():
    private = [(os.path.basename(path), line, attr) for path in _sources()
               for line, attr in _daemon_attributes(path) if attr.startswith("_")]
    assert private == []


def test_the_public_api_they_use_exists():
    used = {attr for path in _sources() for _, attr in _daemon_attributes(path)}
    instance_attrs = {"vms", "advertised", "fleet", "migrations"}
    missing = {a for a in used - instance_attrs if not hasattr(Daemon, a)}
    assert "migrate_vm" in used and not missing, missing
