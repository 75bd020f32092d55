"""What every `frs` subcommand module shares: settings, the misuse error, output, and
how a subcommand is declared (help with an example, --json, the handler)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from services.kit.settings import ServiceSettings


class CliSettings(ServiceSettings):
    service: str = "cli"


class Misuse(Exception):
    """Wrong arguments or input: exit 2 with a one-line hint."""


BENCH_HELP = "benchmarks, as JSON, each against a baseline measured in the same run"

Command = Callable[[argparse.Namespace, CliSettings], Any]


def emit(args: argparse.Namespace, payload: Any, human: str) -> None:
    """--json: the payload alone on stdout; otherwise the human line."""
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    else:
        sys.stdout.write(human + "\n")


def subcommand(subparsers: Any, name: str, help_text: str, example: str, func: Command,
               json_flag: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=func)
    return parser


def group(commands: Any, name: str, help_text: str) -> Any:
    """The subcommands of group ``name`` (e.g. ``bench``), made by whichever module asks
    first and shared with the others."""
    parser = commands.choices.get(name)
    if parser is None:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True)
