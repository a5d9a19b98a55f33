"""``fusedrive-csi --help``: readable, and every option says what it does and its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from csi_frontend.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize(
    "argv", [[], ["serve"], ["call"], ["mounter"]], ids=["top", "serve", "call", "mounter"]
)
def test_help_of_the_real_command_has_no_markup(argv: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "csi_frontend.cli", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "usage: fusedrive-csi" in res.stdout
    assert "``" not in res.stdout and "None" not in res.stdout


@pytest.mark.parametrize("command", ["serve", "call", "mounter"])
def test_every_option_has_help_stating_its_default(command: str) -> None:
    sub = _subparsers(build_parser())[command]
    for group in sub._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction):
                continue
            what = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help"
            if action.option_strings:
                stated = "default" in action.help or "default" in (group.title or "")
                assert stated, f"{command} {what}: the help does not state the default"
