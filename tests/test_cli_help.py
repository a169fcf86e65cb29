"""`rpfs --help` read as a newcomer reads it: every command says what it does, in its
group's list and atop its own --help, and every positional says what it takes, in one
metavar style."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from rpfs.cli.main import build_parser, main

# DISK names an existing disk, NAME a new one; COMMAND and ACTION are the groups' choices;
# TEXT is a description; KEY and VALUE are a repository setting's (`config set`).
METAVARS = {"DISK", "DISK@POINT", "NAME", "SOURCE", "TARGET", "MOUNTPOINT", "TEXT", "KEY",
            "VALUE"}


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """(command words, its parser, its summary in the group's list), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, summaries.get(name)
                yield from commands(sub, (*path, name))


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def help_text(capsys: pytest.CaptureFixture, words: tuple[str, ...]) -> str:
    """What `rpfs WORDS --help` prints."""
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


ALL = list(commands(build_parser()))


def test_the_walk_finds_every_command():
    assert {" ".join(words) for words, _, _ in ALL} >= {
        "init", "capture", "points", "restore", "clone", "disk", "disk create",
        "disk delete", "disks", "snapshot", "rollback", "changed", "allocated", "hydrate",
        "mount", "index", "index restore", "umount",
    }


@pytest.mark.parametrize(("words", "parser", "summary"), ALL,
                         ids=[" ".join(w) for w, _, _ in ALL])
def test_every_command_and_positional_says_what_it_is(capsys, words, parser, summary):
    assert summary, f"rpfs {' '.join(words)}: no one-line summary in its group's --help"
    assert parser.description, f"rpfs {' '.join(words)}: no description atop its --help"
    group = help_text(capsys, words[:-1])
    assert f"{words[-1]} {summary}" in group, group
    own = help_text(capsys, words)
    assert parser.description in own, own
    for action in positionals(parser):
        shown = action.metavar or action.dest
        assert action.help and action.help != argparse.SUPPRESS, (
            f"rpfs {' '.join(words)} {shown}: no help text")
        assert shown in METAVARS, f"rpfs {' '.join(words)}: positional {shown!r} is not one of " \
                                  f"{sorted(METAVARS)}"
        assert f"{shown} {action.help.replace('%%', '%')}" in own, own


def test_json_options_say_what_they_print():
    for words, parser, _ in ALL:
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action.help and "print" in action.help and "JSON" in action.help, (
                    f"rpfs {' '.join(words)} --json: {action.help!r}")


def test_block_size_help_gives_the_range(capsys):
    assert "a power of two from 4K to 4M" in help_text(capsys, ("init",))
