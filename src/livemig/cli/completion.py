"""Shell completion for ``livemig``, generated from its argparse parser.

``livemig completion bash`` prints a script written from the parser itself:
every command path (``vm start``, ``bench convergence``), its subcommands,
its flags, the flags that take a value and the values a flag allows
(``--mode``, ``--workload``, ``--log-level``). A new subcommand or flag is in
the script the next time it is printed, so the script cannot drift from the
CLI.

The script walks the words typed so far: a word naming a subcommand (or a
positional choice) of the current path descends into it; a flag that takes a value skips the next word
(so ``--control vm`` is not read as the ``vm`` command). Then it completes
the value of the previous flag (its choices, or a file name), a flag when the
word starts with ``-``, or else a subcommand or positional choice.

zsh gets the same script behind ``bashcompinit``, zsh's own emulation of
bash's completion functions.
"""
from __future__ import annotations

import argparse
import shlex

SHELLS = ("bash", "zsh")


def _commands(parser: argparse.ArgumentParser, path: str = ""):
    """(path, parser) for the parser and every subparser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}".strip())


def _words(parser: argparse.ArgumentParser) -> list[str]:
    """What a word that is not a flag may be: a subcommand, or a choice of a
    positional argument (``completion bash``)."""
    return [str(choice) for action in parser._actions
            if not action.option_strings and action.choices is not None
            for choice in action.choices]


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def _case(var: str, arms: dict[str, str]) -> str:
    lines = [f'    case "{var}" in']
    for pattern, words in arms.items():
        if words:
            lines.append(f"        {shlex.quote(pattern)}) echo {shlex.quote(words)} ;;")
    lines.append("    esac")
    return "\n".join(lines)


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion script for ``parser`` (named by its ``prog``)."""
    prog = parser.prog
    fn = "_" + prog.replace("-", "_")
    words, flags, takes_value, values = {}, {}, {}, {}
    for path, sub in _commands(parser):
        words[path] = " ".join(_words(sub))
        actions = _flags(sub)
        flags[path] = " ".join(s for a in actions for s in a.option_strings)
        takes_value[path] = " ".join(s for a in actions if a.nargs != 0
                                     for s in a.option_strings)
        for a in actions:
            if a.choices is not None and a.nargs != 0:
                for s in a.option_strings:
                    values[f"{path}|{s}"] = " ".join(map(str, a.choices))
    return f"""\
# {prog} completion for bash, generated from {prog}'s own parser.
# Load it with: source <({prog} completion bash)
{fn}_words() {{
{_case("$1", words)}
}}
{fn}_flags() {{
{_case("$1", flags)}
}}
{fn}_takes_value() {{
{_case("$1", takes_value)}
}}
{fn}_values() {{
{_case("$1|$2", values)}
}}
{fn}() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local path="" word i skip=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        if [[ " $({fn}_takes_value "$path") " == *" $word "* ]]; then
            skip=1
        elif [[ " $({fn}_words "$path") " == *" $word "* ]]; then
            path="${{path:+$path }}$word"
        fi
    done
    local choices
    choices="$({fn}_values "$path" "$prev")"
    if [[ -n "$choices" ]]; then
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
    elif ((COMP_CWORD > 1)) && [[ " $({fn}_takes_value "$path") " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    elif [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$({fn}_flags "$path")" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$({fn}_words "$path")" -- "$cur"))
    fi
}}
complete -o default -F {fn} {prog}
"""


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (one of SHELLS)."""
    script = bash_script(parser)
    if shell == "zsh":
        return (f"# Load it with: source <({parser.prog} completion zsh)\n"
                "autoload -U +X bashcompinit && bashcompinit\n" + script)
    return script
