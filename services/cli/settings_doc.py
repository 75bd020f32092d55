"""`frs settings`: every setting of every service, its environment variable, default and
meaning, generated from the Settings classes (the README's table comes from here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from services.audit.settings import AuditSettings
from services.cli.common import CliSettings, emit, subcommand
from services.dispatch.settings import DispatchSettings
from services.intake.policy.settings import PolicySettings
from services.intake.settings import IntakeSettings
from services.kit.settings import ServiceSettings
from services.oversight.settings import OversightSettings
from services.results.settings import ResultsSettings
from services.vault import VaultSettings

SCOPES: tuple[tuple[str, type[BaseSettings]], ...] = (
    ("every service", ServiceSettings), ("intake", IntakeSettings), ("policy", PolicySettings),
    ("vault", VaultSettings), ("dispatch", DispatchSettings), ("results", ResultsSettings),
    ("audit", AuditSettings), ("oversight", OversightSettings),
)


def _env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    # The base class's own fields take each service's prefix.
    prefix = str(cls.model_config.get("env_prefix", "")) or "FRS_<SVC>_"
    return f"{prefix}{name.upper()}"


_ROOT = Path(__file__).resolve().parents[2]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(computed)"
    value = field.get_default()
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(_ROOT):
        return str(value.relative_to(_ROOT))  # the same in every checkout
    return "-" if value is None else str(value)


def rows() -> list[dict[str, str]]:
    """One row per setting; a subclass lists only what it adds or overrides."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    shared = ServiceSettings.model_fields
    for scope, cls in SCOPES:
        for name, field in cls.model_fields.items():
            if name == "service" or _is_settings(field):
                continue  # a nested Settings (intake's policy) has its own rows
            # A service's copy of a shared setting (not a component's own field that
            # happens to share its name, as the policy gate's FRS_POLICY_KAFKA_*).
            inherited = (cls is not ServiceSettings and issubclass(cls, ServiceSettings)
                         and name in shared)
            if inherited and field.default == shared[name].default:
                continue
            variable = _env_name(cls, name, field)
            if variable in seen:
                continue  # a shared setting a component reads too (FRS_STATE_DIR)
            seen.add(variable)
            out.append({"scope": scope, "variable": variable,
                        "default": _default(field), "meaning": field.description or ""})
    return out


def _is_settings(field: FieldInfo) -> bool:
    kind = field.annotation
    return isinstance(kind, type) and issubclass(kind, BaseSettings)


def markdown() -> str:
    lines = ["| scope | variable | default | meaning |", "|---|---|---|---|"]
    for r in rows():
        meaning = r["meaning"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['scope']} | `{r['variable']}` | `{r['default']}` | {meaning} |")
    return "\n".join(lines) + "\n"


async def cmd_settings(args: argparse.Namespace, _settings: CliSettings) -> int:
    emit(args, rows(), markdown().rstrip("\n"))
    return 0


def register(commands: Any) -> None:
    subcommand(commands, "settings", "list every setting: variable, default, meaning",
               "frs settings --json", cmd_settings)
