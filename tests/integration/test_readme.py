"""The README's "Using it" block, pasted into a shell as a new user would.

The first ``sh`` block of that section runs under ``bash -e`` with a
``livemig`` on PATH that is this tree's; the only changes are free ports for
7400/7401 (another daemon may hold those) and private runtime and state
directories. Every command must succeed, in order: each one follows on from
where the previous left the VM.
"""
import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from support.daemons import ENV

README = Path(__file__).resolve().parents[2] / "README.md"
PASTE_TIMEOUT_S = 600


def using_it_block() -> str:
    text = README.read_text()
    section = text[text.index("## Using it\n"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_using_it_block_runs_as_written(tmp_path):
    block = using_it_block()
    assert "livemig migrate web" in block and "7400" in block and "7401" in block
    ports = {"7400": str(_free_port()), "7401": str(_free_port())}
    script = re.sub(r"\b(7400|7401)\b", lambda m: ports[m.group(1)], block)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "livemig"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m livemig "$@"\n')
    shim.chmod(0o755)
    env = {**ENV, "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
           "XDG_RUNTIME_DIR": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    try:
        proc = subprocess.run(["bash", "-e", "-c", script], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=PASTE_TIMEOUT_S)
    finally:
        for port in ports.values():   # a failed paste must not leave daemons behind
            subprocess.run([str(shim), "shutdown", "--daemon", f"127.0.0.1:{port}"], env=env,
                           capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    out = proc.stdout
    assert out.count(": completed") >= 2, out[-4000:]
    assert "Traceback" not in proc.stderr
    history = [line for line in out.splitlines() if " web " in line and "completed" in line]
    assert any(" in " in line for line in history) and any(" out " in line for line in history)
