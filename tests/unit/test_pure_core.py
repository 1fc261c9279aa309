"""The pure core imports no I/O, no event loop and no native code.

The page codec is deliberately not in the list: its hot loops are native
(docs/codec.md says why), though it does no I/O either.
"""
import importlib.util
import json
import os
import subprocess
import sys

PURE = ["livemig.protocol", "livemig.protocol.spec", "livemig.protocol.wire", "livemig.protocol.events",
        "livemig.protocol.state", "livemig.protocol.connection", "livemig.errors",
        "livemig.pages", "livemig.policy", "livemig.stats", "livemig.config",
        "livemig.units", "livemig.addresses"]
FORBIDDEN = ["asyncio", "socket", "ssl", "selectors", "livemig.native", "livemig._native",
             "uvloop", "cffi"]

PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in {forbidden!r} if m in sys.modules)))
"""


def test_pure_modules_import_no_io_or_native():
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(importlib.util.find_spec("livemig").origin))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PROBE.format(modules=PURE, forbidden=FORBIDDEN)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"a pure-core module does not import:\n{proc.stderr}"
    bad = json.loads(proc.stdout)
    assert bad == [], f"pure core pulled in {bad}"
