"""FRS_STATE_URL: SQLite in the state dir by default, or PostgreSQL without a password in
the URL; a bad value stops the start with what to set instead."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from services.kit.private_files import ExposedFileError
from services.kit.settings import ServiceSettings
from services.kit.state import PostgresState, SqliteState, open_state, parse_state_url

PG = "postgresql://intake@127.0.0.1:15432/frs"


def test_default_is_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    url = ServiceSettings(state_dir=tmp_path).state()
    assert (url.backend, url.sqlite_dir) == ("sqlite", tmp_path)
    assert parse_state_url(f"sqlite:///{tmp_path}", tmp_path).sqlite_dir == tmp_path


def test_sqlite_elsewhere_than_the_state_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set FRS_STATE_DIR="):
        parse_state_url(f"sqlite:///{tmp_path}/other", tmp_path)
    with pytest.raises(ValueError, match="three slashes"):
        parse_state_url("sqlite://host/x", tmp_path)


def test_postgresql_url(tmp_path: Path) -> None:
    url = ServiceSettings(state_url=PG).state()
    assert url.postgres and url.conninfo == PG


@pytest.mark.parametrize(("value", "error"), [
    ("postgresql://intake:secret@127.0.0.1/frs", "must not carry a password"),
    ("postgresql://127.0.0.1/frs", "want postgresql://ROLE@HOST"),
    ("postgresql://intake@127.0.0.1/", "want postgresql://ROLE@HOST"),
    ("mysql://intake@127.0.0.1/frs", "want sqlite:///DIR or postgresql"),
])
def test_bad_urls_say_what_to_set(value: str, error: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=error):
        parse_state_url(value, tmp_path)


def test_a_password_in_the_url_is_not_echoed_by_the_settings_error() -> None:
    with pytest.raises(ValueError) as caught:
        ServiceSettings(state_url="postgresql://intake:hunter2@127.0.0.1/frs")
    assert "hunter2" not in str(caught.value)


def test_another_host_needs_tls_outside_local_mode(tmp_path: Path) -> None:
    remote = "postgresql://intake@db.example:5432/frs"
    with pytest.raises(ValueError, match="sslmode=verify-full"):
        parse_state_url(remote, tmp_path, local_mode=False)
    assert parse_state_url(remote + "?sslmode=verify-full", tmp_path, local_mode=False).postgres
    assert parse_state_url(remote, tmp_path).postgres  # local mode: the operator's call


async def test_open_state_reads_only_a_private_password_file(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        state = open_state(parse_state_url(None, tmp_path), None, stack, name="intake")
        assert state == SqliteState(tmp_path)
        secret = tmp_path / "intake.password"
        secret.write_text("pw\n")
        secret.chmod(0o644)
        with pytest.raises(ExposedFileError, match="chmod 600"):
            open_state(parse_state_url(PG, tmp_path), secret, stack, name="intake")
        secret.chmod(0o600)
        pg = open_state(parse_state_url(PG, tmp_path), secret, stack, name="intake")
        assert isinstance(pg, PostgresState)  # made, not connected: no server needed


def test_frs_db_on_sqlite_has_nothing_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli.entry import main

    monkeypatch.setenv("FRS_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FRS_STATE_URL", raising=False)
    for command in ("migrate", "status"):
        assert main(["db", command, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "backend": "sqlite", "url": f"sqlite:///{tmp_path}", "applied": []}
