"""The pure core (pages, policy, stats, config) imports no I/O and no native code."""
import subprocess
import sys

PURE = ["livemig.pages", "livemig.policy", "livemig.stats", "livemig.config"]


def test_pure_modules_import_no_io_or_native():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE) +
            "bad = [m for m in ('asyncio', 'socket', 'livemig._native', 'livemig.native', 'cffi')"
            " if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
