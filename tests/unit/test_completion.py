"""Shell completion is written from the parser: every subcommand is in it,
bash accepts it, and it completes what the parser allows."""
import argparse
import shutil
import subprocess

import pytest

from livemig.cli import build_parser, main
from livemig.cli.completion import completion_script


def _all_subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name
                yield from _all_subcommands(sub)


def _script(shell, capsys):
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


def test_the_script_names_every_subcommand_the_parser_has(capsys):
    script = _script("bash", capsys)
    names = list(_all_subcommands(build_parser()))
    assert {"daemon", "migrate", "vm", "start", "convergence", "completion"} <= set(names)
    missing = [n for n in names if n not in script]
    assert not missing, f"subcommands missing from the script: {missing}"


def test_bash_accepts_the_script(tmp_path, capsys):
    path = tmp_path / "livemig.bash"
    path.write_text(_script("bash", capsys))
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _complete(script_path, *words):
    """COMPREPLY for the command line ``words`` (the last is the word being typed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    proc = subprocess.run(
        ["bash", "-c", f'source "$1"; COMP_WORDS=({quoted}); '
         'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _livemig; printf "%s\\n" "${COMPREPLY[@]}"',
         "complete", str(script_path)], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


@pytest.mark.parametrize("words, expected", [
    (("livemig", "vm", "st"), {"start", "stop"}),
    (("livemig", "migrate", "web", "--mode", ""), {"precopy", "postcopy", "hybrid"}),
    (("livemig", "vm", "start", "web", "--workload", "mem"), {"memtest"}),
    (("livemig", "daemon", "--log-l"), {"--log-level"}),
    (("livemig", "completion", ""), {"bash", "zsh"}),
    # a flag's value is not a command: --control vm does not enter `vm`
    (("livemig", "status", "--control", "vm", "--wa"), {"--watch"}),
])
def test_bash_completes_what_the_parser_allows(tmp_path, capsys, words, expected):
    path = tmp_path / "livemig.bash"
    path.write_text(_script("bash", capsys))
    assert _complete(path, *words) == expected


def test_zsh_loads_the_script_through_bashcompinit(tmp_path):
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed here")
    path = tmp_path / "livemig.zsh"
    path.write_text(completion_script("zsh", build_parser()))
    proc = subprocess.run(["zsh", "-c", f'autoload -U compinit && compinit -u; source "{path}"'],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
