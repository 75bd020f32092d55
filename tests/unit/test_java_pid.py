"""deploy/java.sh's liveness check: a killed server nobody has reaped yet is a zombie that
still answers ``kill -0``. Here PID 1 reaps such orphans only now and then, and a CI run
once found a restarted cluster node "already running" (its zombie) and never started it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.helpers import alive


def pid_running(pidfile: Path) -> bool:
    return subprocess.run(["bash", "-c", f'source "{ROOT}/deploy/java.sh"; pid_running "$1"',
                           "_", str(pidfile)]).returncode == 0


def test_a_zombie_is_not_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "server.pid"
    child = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(str(child.pid))
        assert pid_running(pidfile) and alive(child.pid)
        child.send_signal(signal.SIGKILL)
        # Not reaped (no wait yet): a zombie, our child, until child.wait().
        for _ in range(100):
            if not alive(child.pid):
                break
            subprocess.run(["sleep", "0.02"])
        assert not pid_running(pidfile)
        assert not alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_running(pidfile) and not pid_running(tmp_path / "none.pid")
