"""The ``frs`` command. Exit codes: 0 success, 1 a finding, 2 misuse (and a failure to
reach, authenticate to or be authorized by the bus, which the user must fix first).

``--json`` prints machine-readable output on stdout and nothing else; errors go to
stderr in one line that says what to do.

Each top-level command lives in a module that is imported only when that command runs
(or its ``--help`` is asked for), so ``frs --help`` imports no Kafka client, no image
library and no service."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

# name → (one-line help, modules that add its subcommands with ``register(commands)``)
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "topics": ("manage the catalog's Kafka topics", ("main",)),
    "submit": ("encrypt a probe photo to the intake and submit it", ("main",)),
    "timeline": ("print a probe's events in order", ("main",)),
    "registry": ("publish registry entries; suspend or activate a provider; trust a key",
                 ("main", "policy")),
    "policy": ("validate and explain Cedar policy decisions", ("policy",)),
    "exigent": ("supervisor review of exigent clearances", ("policy",)),
    "review": ("examiner review of candidate lists", ("results",)),
    "bench": ("benchmarks, as JSON, each against a baseline measured in the same run",
              ("bench_intake", "dispatch", "audit", "bench_pipeline", "oversight")),
    "acl": ("least privilege on the bus: Kafka ACLs", ("acl",)),
    "audit": ("verify, replay and report on the audit log", ("audit",)),
    "oversight": ("usage oversight: report and replay of usage alerts", ("oversight",)),
    "settings": ("list every setting: variable, default, meaning", ("settings_doc",)),
    "profile": ("client profiles: who frs is on the bus (--as ROLE)", ("profile_cmd",)),
    "db": ("the shared PostgreSQL database: schema migrations and status", ("db",)),
    "status": ("instances of each service: their partitions, lag, partitions without "
               "an owner, the audit leader", ("status",)),
}

EPILOG = """examples:
  frs --as upstream submit --image face.jpg --case CASE-1 --agent agent-7 \\
      --purpose human_trafficking --roi ROI-1 --source surveillance --nexus VA
  frs --as auditor audit verify --checkpoints-from-kafka
  frs --as operator status
  frs topics create --json

every command: frs COMMAND --help (each with an example)"""


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--as", dest="profile", metavar="ROLE", default=None,
        help="act as this client profile (a name in $FRS_PROFILE_DIR, or a file); "
             "default $FRS_PROFILE. `frs profile list` shows them")


def _scan(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The top-level command named on the line and the ``--as`` profile before it."""
    profile: str | None = None
    args = iter(argv)
    for arg in args:
        if arg == "--as":
            profile = next(args, None)
        elif arg.startswith("--as="):
            profile = arg.removeprefix("--as=")
        elif not arg.startswith("-"):
            return arg, profile
    return None, profile


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full subcommands of the command named in ``argv`` (all of
    them when ``argv`` is None) and one-line stubs for the rest."""
    parser = argparse.ArgumentParser(
        prog="frs", description="frs-broker: compliance-first facial recognition broker",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _scan(argv)[0] if argv is not None else None
    wanted = list(COMMANDS) if argv is None else [chosen] if chosen in COMMANDS else []
    modules = dict.fromkeys(m for name in wanted for m in COMMANDS[name][1])
    for module in modules:
        importlib.import_module(f"services.cli.{module}").register(commands)
    for name, (help_text, _) in COMMANDS.items():
        if name in commands.choices:
            _set_help(commands, name, help_text)
        else:
            commands.add_parser(name, help=help_text, description=help_text)
    return parser


def _set_help(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
              help_text: str) -> None:
    # The overview shows the table's help for every command, loaded or stub.
    for action in commands._choices_actions:
        if action.dest == name:
            action.help = help_text


def main(argv: Sequence[str] | None = None) -> int:
    line = list(sys.argv[1:] if argv is None else argv)
    from services.cli.profiles import ProfileError, apply_profile

    try:
        # Before the parser: the profile's paths are the defaults its options show.
        apply_profile(_scan(line)[1])
    except ProfileError as exc:
        sys.stderr.write(f"frs: {exc}\n")
        return 2
    parser = build_parser(line)
    args = parser.parse_args(line)
    if not hasattr(args, "func"):  # a stub: the command's module is not loaded
        parser.parse_args([*line, "--help"])
        return 2
    from services.cli.common import CliSettings, Misuse
    from services.cli.errors import ConnectionDiagnosis, explain

    try:
        settings = CliSettings()
    except ValueError as exc:  # pydantic's ValidationError: a setting is wrong
        first = str(exc).splitlines()
        sys.stderr.write(f"frs: invalid settings: {' '.join(first[1:3]).strip()}\n")
        return 2
    diagnosis = ConnectionDiagnosis().install()
    try:
        result = asyncio.run(args.func(args, settings))
    except Misuse as exc:
        sys.stderr.write(f"frs: {exc}\n")
        return 2
    except LookupError as exc:
        sys.stderr.write(f"frs: {exc.args[0]}\n")
        return 2
    except Exception as exc:
        message = explain(exc, settings, diagnosis.last)
        if message is None:
            raise
        sys.stderr.write(f"frs: {message}\n")
        return 2
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
