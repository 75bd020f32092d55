"""``frs profile list|show|save``: the client profiles behind ``frs --as ROLE``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from services.cli.common import CliSettings, Misuse, emit, group, subcommand
from services.cli.profiles import (
    ProfileError,
    parse_profile,
    profile_dir,
    profile_path,
    read_profile,
    write_profile,
)


async def cmd_profile_list(args: argparse.Namespace, settings: CliSettings) -> int:
    directory = profile_dir()
    names = sorted(p.stem for p in directory.glob("*.env")) if directory.is_dir() else []
    emit(args, {"dir": str(directory), "profiles": names},
         "\n".join(names) if names else f"no profiles in {directory} (deploy/up.sh writes them)")
    return 0


async def cmd_profile_show(args: argparse.Namespace, settings: CliSettings) -> int:
    try:
        values = read_profile(args.name)
    except ProfileError as exc:
        raise Misuse(str(exc)) from None
    # Paths and names only: a profile never holds a secret itself.
    emit(args, {"path": str(profile_path(args.name)), "values": values},
         "\n".join(f"{k}={v}" for k, v in values.items()))
    return 0


async def cmd_profile_save(args: argparse.Namespace, settings: CliSettings) -> int:
    values: dict[str, str] = {}
    if args.env_file:
        try:
            source = Path(args.env_file)
            values.update(parse_profile(source.read_text(), source))
        except OSError as exc:
            raise Misuse(f"cannot read {args.env_file}: {exc.strerror}") from None
        except ProfileError as exc:
            raise Misuse(str(exc)) from None
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("FRS_"):
            raise Misuse(f"--set takes FRS_NAME=value, not {item!r}")
        values[key] = value
    if not values:
        raise Misuse("nothing to save: give --env-file FILE and/or --set FRS_NAME=value")
    path = profile_path(args.name)
    write_profile(path, values)
    emit(args, {"path": str(path), "keys": sorted(values)}, f"saved profile {path}")
    return 0


def register(commands: Any) -> None:
    cmds = group(commands, "profile", "client profiles: who frs is on the bus (--as ROLE)")
    subcommand(cmds, "list", "list the profiles in $FRS_PROFILE_DIR", "frs profile list",
               cmd_profile_list)
    show = subcommand(cmds, "show", "print a profile's settings (paths, never secrets)",
                      "frs profile show auditor", cmd_profile_show)
    show.add_argument("name", help="profile name or file")
    save = subcommand(cmds, "save", "write a profile, 0600 in a 0700 directory",
                      "frs profile save upstream --env-file .state/kafka/env/upstream.env "
                      "--set FRS_INTAKE_PUBLIC_KEY_FILE=$PWD/.state/keys/intake.key.pub.pem",
                      cmd_profile_save)
    save.add_argument("name", help="profile name (or a file path)")
    save.add_argument("--env-file", default=None,
                      help="FRS_*=value lines to start from (e.g. the broker's env/ROLE.env)")
    save.add_argument("--set", action="append", default=[], metavar="FRS_NAME=value",
                      help="one more setting (repeat)")
