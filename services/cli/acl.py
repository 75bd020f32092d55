"""``frs acl ...``: the ACL file (services/kit/acls.json) as Kafka ACLs and as a table.

Exit codes: 0 success, 1 a finding (the broker's ACLs differ from the file), 2 misuse."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.cli.common import CliSettings, Misuse, emit, subcommand
from services.kit.acls import ACL_FILE, AclFile, bindings, load, markdown_table

# The Kafka release the broker scripts fetch (deploy/kafka/pom.xml; a test keeps them equal).
KAFKA_VERSION = "4.1.1"
# Run with `java` on the broker's own jars: aiokafka has no ACL API.
ACLS_TOOL = Path(__file__).resolve().parent / "Acls.java"


def _load(path: str) -> AclFile:
    try:
        return load(Path(path))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise Misuse(f"cannot use ACL file {path}: {str(exc).splitlines()[0]}") from None


def default_jars() -> Path:
    """Where broker.sh caches the Kafka jars (same rule as the script)."""
    if os.environ.get("FRS_KAFKA_JARS"):
        return Path(os.environ["FRS_KAFKA_JARS"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "frs-broker" / f"kafka-{KAFKA_VERSION}"


def run_acls_tool(mode: str, admin_config: Path, jars: Path, stdin: str = ""
                  ) -> subprocess.CompletedProcess[str]:
    """Acls.java on the broker's jars, as the admin (certificate on the internal listener)."""
    if not (jars / ".complete").exists():
        raise Misuse(f"no Kafka jars in {jars}: run deploy/kafka/broker.sh fetch or set "
                     "FRS_KAFKA_JARS")
    if not admin_config.is_file():
        raise Misuse(f"admin client config not found: {admin_config} (broker.sh start "
                     "--secure writes it into the broker's state dir)")
    return subprocess.run(
        ["java", "-cp", f"{jars}/*", str(ACLS_TOOL), mode, str(admin_config)],
        input=stdin, capture_output=True, text=True, timeout=180, check=False,
    )


def _admin_config(args: argparse.Namespace) -> Path:
    value = args.admin_config or os.environ.get("FRS_KAFKA_ADMIN_CONFIG")
    if not value:
        raise Misuse("give --admin-config FILE or set FRS_KAFKA_ADMIN_CONFIG "
                     "(the broker's state dir has admin.properties)")
    return Path(value)


async def cmd_acl_apply(args: argparse.Namespace, _settings: CliSettings) -> int:
    doc = _load(args.file)
    wanted = bindings(doc)
    done = run_acls_tool("apply", _admin_config(args), Path(args.jars),
                         "".join(b.tsv() + "\n" for b in wanted))
    if done.returncode != 0:
        sys.stderr.write(f"frs: applying ACLs failed: {done.stderr.strip().splitlines()[-1:]}\n")
        return 2
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    summary["bindings"] = len(wanted)
    emit(args, summary, f"ACLs: {summary['created']} created, {summary['deleted']} deleted, "
                         f"{summary['unchanged']} unchanged ({len(wanted)} in {args.file})")
    return 0


async def cmd_acl_check(args: argparse.Namespace, _settings: CliSettings) -> int:
    """Compare the broker's ACLs with the file (exit 1 on any difference)."""
    doc = _load(args.file)
    wanted = {(b.resource_type, b.pattern_type, b.name, b.principal, b.operation, "ALLOW", "*")
              for b in bindings(doc)}
    done = run_acls_tool("list", _admin_config(args), Path(args.jars))
    if done.returncode != 0:
        sys.stderr.write("frs: listing ACLs failed\n")
        return 2
    actual = {tuple(line.split("\t")) for line in done.stdout.splitlines() if line.strip()}
    missing = sorted(wanted - actual)
    extra = sorted(actual - wanted)
    emit(args, {"missing": missing, "extra": extra},
          "broker ACLs match the file" if not (missing or extra)
          else "\n".join([*(f"missing {' '.join(m)}" for m in missing),
                          *(f"extra   {' '.join(e)}" for e in extra)]))
    return 1 if missing or extra else 0


async def cmd_acl_table(args: argparse.Namespace, _settings: CliSettings) -> int:
    doc = _load(args.file)
    emit(args, {name: g.model_dump() for name, g in doc.principals.items()},
          markdown_table(doc))
    return 0


def register(commands: Any) -> None:
    acl = commands.add_parser("acl", help="least privilege on the bus: Kafka ACLs")
    cmds = acl.add_subparsers(dest="acl_command", required=True)
    apply_ = subcommand(cmds, "apply", "make the broker's ACLs exactly those of the ACL file "
                  "(idempotent: a second run changes nothing)",
                  "frs acl apply --admin-config .state/kafka/admin.properties", cmd_acl_apply)
    check = subcommand(cmds, "check", "compare the broker's ACLs with the ACL file (exit 1 if "
                 "they differ)", "frs acl check --admin-config .state/kafka/admin.properties",
                 cmd_acl_check)
    for p in (apply_, check):
        p.add_argument("--admin-config", default=None,
                       help="Java client properties of the admin (default: "
                            "$FRS_KAFKA_ADMIN_CONFIG)")
        p.add_argument("--jars", default=str(default_jars()), help="the broker's Kafka jars")
    table = subcommand(cmds, "table", "print the ACL file as the README's markdown table",
                 "frs acl table", cmd_acl_table)
    for p in (apply_, check, table):
        p.add_argument("--file", default=str(ACL_FILE), help="the ACL file")
