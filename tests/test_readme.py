"""README.md runs as written: every ```python block is executed (in order, one namespace); every
command of every ```bash block is parsed by the real CLI parser, and the cheap ones run."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from gradprobe import cli

README = Path(__file__).resolve().parent.parent / "README.md"
# commands that are documented but not run here: installs, the test suite itself, the GPU script
NOT_RUN = ("pip install", "pytest", "bash bench/run_gpu.sh")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def commands(block: str) -> list[str]:
    """Logical command lines of a bash block: continuations joined, comments and blank lines dropped;
    ``a && b`` gives two commands."""
    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [c.strip() for c in line.split("&&")]
    return out


def test_readme_has_code_blocks():
    assert blocks("python") and blocks("bash")


def test_python_blocks_run():
    namespace: dict = {}
    for i, code in enumerate(blocks("python")):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)  # noqa: S102


BASH = [c for b in blocks("bash") for c in commands(b)]


@pytest.mark.parametrize("command", BASH)
def test_bash_commands_parse_and_the_cheap_ones_run(command, capsys):
    argv = shlex.split(command)
    if command.startswith(NOT_RUN):
        return
    if argv[:3] == ["python", "-m", "gradprobe.env"] or argv == ["gradprobe", "env"]:
        assert cli.main(["env"]) == 0
        assert "row_threshold" in capsys.readouterr().out
        return
    if argv[0] == "torchrun":  # torchrun [its options] -m gradprobe ARGS: the gradprobe part must parse
        argv = ["gradprobe", *argv[argv.index("gradprobe") + 1 :]]
    assert argv[0] == "gradprobe", f"README command {command!r} is neither run nor listed in NOT_RUN"
    args = cli.build_parser().parse_args(argv[1:])  # SystemExit(2) on any option the CLI lacks
    assert args.command in ("prune", "eval", "env")


def test_every_option_has_help():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"gradprobe {name} {action.option_strings[0]} has no help text"
