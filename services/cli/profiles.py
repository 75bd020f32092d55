"""Client profiles: who ``frs`` is on the bus, chosen with ``--as ROLE`` or ``FRS_PROFILE``.

A profile is a file of ``FRS_*=value`` lines (the shared settings of one outside role:
bootstrap, security protocol, CA, client certificate and key, SCRAM user and the path of
its password file, and the paths a role's commands need, such as the intake's public
key). ``deploy/up.sh`` writes one per outside role (upstream, operator, supervisor,
auditor) into the profile directory, mode 0600 in a 0700 directory. The password stays in
its own 0600 file, named by path: the secret exists once, and a rotation that rewrites it
needs no new profile.

A name is looked up as ``$FRS_PROFILE_DIR/NAME.env`` (default
``${XDG_CONFIG_HOME:-~/.config}/frs/profiles``); anything with a ``/`` is a file path.
The profile's values win over the environment for the variables it sets: ``--as`` is the
more explicit choice."""

from __future__ import annotations

import os
from pathlib import Path

from services.kit.private_files import ExposedFileError, read_private, write_private

PROFILE_ENV = "FRS_PROFILE"
PROFILE_DIR_ENV = "FRS_PROFILE_DIR"


class ProfileError(Exception):
    """A profile that cannot be used; the message says what to do."""


def profile_dir() -> Path:
    if os.environ.get(PROFILE_DIR_ENV):
        return Path(os.environ[PROFILE_DIR_ENV])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "frs" / "profiles"


def profile_path(name: str) -> Path:
    if "/" in name or name.endswith(".env"):
        return Path(name)
    return profile_dir() / f"{name}.env"


def read_profile(name: str) -> dict[str, str]:
    """The profile's variables. Refuses a file others may read: it names key material."""
    path = profile_path(name)
    try:
        text = read_private(path).decode()
    except FileNotFoundError:
        known = sorted(p.stem for p in profile_dir().glob("*.env")) if profile_dir().is_dir() \
            else []
        hint = f"known profiles: {', '.join(known)}" if known else \
            "deploy/up.sh writes one per outside role"
        raise ProfileError(f"no profile {name!r} at {path} ({hint})") from None
    except ExposedFileError as exc:
        raise ProfileError(f"profile {exc}") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    return parse_profile(text, path)


def parse_profile(text: str, path: Path) -> dict[str, str]:
    """``FRS_NAME=value`` lines; blank lines and ``#`` comments are skipped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.startswith("FRS_") or not key.replace("_", "").isalnum():
            raise ProfileError(f"profile {path} line {number}: expected FRS_NAME=value")
        values[key] = value.strip()
    return values


def apply_profile(name: str | None) -> str | None:
    """Load the named profile (or ``$FRS_PROFILE``) into this process's environment,
    before any settings are read. Returns the profile's name, or None when there is none."""
    chosen = name or os.environ.get(PROFILE_ENV) or None
    if chosen is None:
        return None
    os.environ.update(read_profile(chosen))
    return chosen


def write_profile(path: Path, values: dict[str, str]) -> None:
    write_private(path, "".join(f"{key}={value}\n" for key, value in values.items()).encode())
