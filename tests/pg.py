"""A real PostgreSQL server for tests: the one deploy/test.sh started (its state dir in
FRS_TEST_PG_STATE), or one started here by deploy/postgres/pg.sh in a temporary state dir
on a free port. Every role's settings come from the script's env/ROLE.env files."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port_block

ROOT = Path(__file__).resolve().parent.parent
PG_SH = ROOT / "deploy" / "postgres" / "pg.sh"
# The login roles pg.sh makes: one per service, and the auditors' read-only one.
SERVICE_ROLES = ("intake", "dispatch", "results", "audit", "auditor")


@dataclass(frozen=True)
class PgServer:
    state: Path
    port: int
    owned: bool  # started here, so stopped here

    def settings(self, role: str) -> dict[str, str]:
        """FRS_STATE_URL and FRS_STATE_PASSWORD_FILE of ``role`` (a service, or owner)."""
        lines = (self.state / "env" / f"{role}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def url(self, role: str) -> str:
        return self.settings(role)["FRS_STATE_URL"]

    def password(self, role: str) -> str:
        return Path(self.settings(role)["FRS_STATE_PASSWORD_FILE"]).read_text().strip()

    def script_env(self) -> dict[str, str]:
        return {**os.environ, "FRS_PG_STATE": str(self.state), "FRS_PG_PORT": str(self.port)}

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(PG_SH), command], env=self.script_env(), check=check,
                              capture_output=True, text=True, timeout=600)


def private_tmpdir(prefix: str) -> Path:
    """A fresh directory the server's OS user may enter but nobody may list (pytest's
    tmp_path sits under a 0700 directory the server's user cannot reach)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


def start_server(state: Path | None = None, port: int | None = None) -> PgServer:
    """Start a server with pg.sh (CalledProcessError when it cannot)."""
    server = PgServer(state or private_tmpdir("frs-pg-") / "pg", port or free_port_block(1), True)
    server.run("start")
    return server


def stop_server(server: PgServer) -> None:
    if server.owned:
        server.run("stop", check=False)
        shutil.rmtree(server.state.parent, ignore_errors=True)


def existing_server() -> PgServer | None:
    """The server deploy/test.sh started, if it did."""
    state = os.environ.get("FRS_TEST_PG_STATE")
    if not state:
        return None
    url = (Path(state) / "env" / "owner.env").read_text()
    port = int(url.split("@127.0.0.1:", 1)[1].split("/", 1)[0])
    return PgServer(Path(state), port, owned=False)


def must_run() -> bool:
    """deploy/test.sh sets FRS_TEST_PG_REQUIRED: there, a server that cannot start fails
    the PostgreSQL tests instead of skipping them."""
    return os.environ.get("FRS_TEST_PG_REQUIRED") == "1"
