"""What users run, as they run it: the wheel installed into a new venv, ``frs`` called
from a directory outside the repository, ``deploy/up.sh`` started as the README says, and
every command it prints and every ``frs`` line of the README's code blocks pasted as
written into a clean shell (no FRS_* variables but the profile directory).

One module-scoped stack: up.sh on the secured bus with its own state, ports and profile
directory; then a restart of up.sh on the same state, where a request id of the first
run resubmitted with other content must end in ``request_id_reused``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import pytest

from services.cli.entry import build_parser
from tests.conftest import free_port_block

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "deploy" / "up.sh"
pytestmark = pytest.mark.users


def _clean_env(**extra: str) -> dict[str, str]:
    """A new shell's environment: nothing of this test's FRS_* settings leaks in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FRS_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed_frs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` of the wheel built from this checkout, into a venv of its own."""
    work = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the source files git knows (tracked or not ignored): the build
    # leaves nothing in the checkout, and no local state or cache can reach the wheel.
    source = work / "source"
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard",
                             "pyproject.toml", "README.md", "schemas", "services"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(work / "dist"), str(source)], check=True, env=_clean_env())
    wheel = next((work / "dist").glob("frs_broker-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    subprocess.run([str(work / "venv/bin/python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, env=_clean_env())
    return work / "venv" / "bin" / "frs"


def _command_paths() -> list[list[str]]:
    """Every command path of the parser (``audit verify``, ``bench intake``, ...)."""
    paths: list[list[str]] = []

    def walk(parser: object, prefix: list[str]) -> None:
        for action in getattr(parser, "_actions", []):
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                for name, sub in choices.items():
                    paths.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return paths


def test_help_of_every_subcommand_from_outside_the_repository(
        installed_frs: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    top = subprocess.run([str(installed_frs), "--help"], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True)
    assert top.returncode == 0, top.stderr
    assert "example" in top.stdout
    assert time.monotonic() - started < 5
    paths = _command_paths()
    assert ["bench", "pipeline"] in paths and ["audit", "verify"] in paths
    failures = []
    for path in paths:
        done = subprocess.run([str(installed_frs), *path, "--help"], cwd=tmp_path,
                              env=_clean_env(), capture_output=True, text=True)
        leaf = not any(p[:len(path)] == path and len(p) > len(path) for p in paths)
        if done.returncode != 0 or (leaf and "example" not in done.stdout):
            failures.append(f"frs {' '.join(path)} --help: rc={done.returncode} "
                            f"{done.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


# --- the stack that up.sh starts ----------------------------------------------------


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    output: list[str]
    steps: list[str]
    env: dict[str, str]


def _start_up(env: dict[str, str], log: Path, timeout: float = 300) -> Stack:
    """``deploy/up.sh`` (not --demo) until it prints its next steps."""
    with open(log, "a") as out:
        proc = subprocess.Popen(["bash", str(UP)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=out, text=True, start_new_session=True)
    assert proc.stdout is not None
    # A reader thread, so a silent up.sh cannot hang the test past its deadline.
    queue: Queue[str] = Queue()
    threading.Thread(target=lambda: [queue.put(line) for line in proc.stdout or ()],
                     daemon=True).start()
    lines: list[str] = []
    steps: list[str] | None = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = queue.get(timeout=max(0.1, deadline - time.monotonic())).rstrip("\n")
        except Empty:
            break
        lines.append(line)
        if line.startswith("next steps:"):
            steps = []
        elif steps is not None and line.startswith("  "):
            steps.append(line.strip())
        elif steps is not None:
            return Stack(proc, lines, steps, env)
    _stop_up(proc)
    raise AssertionError(f"up.sh printed no next steps: {lines[-20:]}\n"
                         f"{log.read_text()[-3000:]}")


def _stop_up(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops it: up.sh stops what it started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _paste(command: str, cwd: Path, env: dict[str, str],
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def up_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("up")
    kafka_port = free_port_block(3)
    web = free_port_block(2)
    return _clean_env(
        FRS_UP_STATE=str(base / "state"), FRS_PROFILE_DIR=str(base / "profiles"),
        FRS_KAFKA_PORT=str(kafka_port), FRS_DEMO_VENDOR_PORT=str(web),
        FRS_DEMO_WEBHOOK_PORT=str(web + 1), FRS_AUDIT_CHECKPOINT_INTERVAL_S="1")


@pytest.fixture(scope="module")
def stack(up_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    log = tmp_path_factory.mktemp("up-log") / "up.log"
    running = _start_up(up_env, log)
    try:
        yield running
    finally:
        _stop_up(running.proc)


def _shell_env(stack: Stack) -> dict[str, str]:
    # Another terminal of the same user: the profile directory up.sh wrote, nothing else.
    return _clean_env(FRS_PROFILE_DIR=stack.env["FRS_PROFILE_DIR"])


def test_every_printed_step_works_pasted_from_tmp(stack: Stack, tmp_path: Path) -> None:
    assert len(stack.steps) >= 5, stack.steps
    for step in stack.steps:
        done = _paste(step, tmp_path, _shell_env(stack))
        assert done.returncode == 0, f"{step}\n{done.stdout[-1000:]}\n{done.stderr[-1000:]}"
    assert (Path("/tmp/frs-report.html")).is_file()


def _readme_commands() -> list[str]:
    """Every line of a README code block that runs ``frs``."""
    commands, fenced = [], False
    for raw in (ROOT / "README.md").read_text().splitlines():
        if raw.startswith("```"):
            fenced = not fenced
            continue
        line = raw.split("  #")[0].strip()
        if fenced and line.startswith("frs "):
            commands.append(line)
    return commands


def test_every_readme_frs_command_works_as_written(
        stack: Stack, installed_frs: Path, tmp_path: Path) -> None:
    commands = _readme_commands()
    assert len(commands) >= 5, commands
    shutil.copy(Path(stack.env["FRS_UP_STATE"]) / "sample.jpg", tmp_path / "photo.jpg")
    env = _shell_env(stack)
    env["PATH"] = f"{installed_frs.parent}:{env['PATH']}"
    for command in commands:
        done = _paste(command, tmp_path, env)
        assert done.returncode == 0, f"{command}\n{done.stdout[-800:]}\n{done.stderr[-800:]}"


def test_installed_frs_submits_settles_and_verifies(
        stack: Stack, installed_frs: Path, tmp_path: Path) -> None:
    frs = str(installed_frs)
    env = _shell_env(stack)
    image = Path(stack.env["FRS_UP_STATE"]) / "sample.jpg"
    request_id = f"users-{time.time_ns()}"
    submit = subprocess.run(
        [frs, "--as", "upstream", "submit", "--image", str(image), "--case", "CASE-1",
         "--agent", "agent-7", "--purpose", "human_trafficking", "--roi", "ROI-1",
         "--source", "surveillance", "--nexus", "VA", "--request-id", request_id, "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr
    timeline = subprocess.run(
        [frs, "--as", "auditor", "timeline", request_id, "--until", "frs.probe.settled.v1",
         "--wait", "90", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert timeline.returncode == 0, timeline.stderr
    assert "frs.candidates.received.v1" in timeline.stdout
    time.sleep(2)  # one checkpoint interval: the settled probe's leaves get signed
    verify = subprocess.run([frs, "--as", "auditor", "audit", "verify",
                             "--checkpoints-from-kafka"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok:")


def test_misuse_and_bus_errors_say_what_is_wrong(
        stack: Stack, installed_frs: Path, tmp_path: Path) -> None:
    frs = str(installed_frs)
    env = _shell_env(stack)
    bootstrap = f"127.0.0.1:{stack.env['FRS_KAFKA_PORT']}"
    # Plaintext against the secured listener: not "start the broker", but "use a profile".
    plain = subprocess.run([frs, "timeline", "x", "--wait", "0"], cwd=tmp_path,
                           env={**env, "FRS_KAFKA_BOOTSTRAP": bootstrap},
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert "--as ROLE" in plain.stderr and "broker.sh start" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    denied = subprocess.run([frs, "--as", "auditor", "registry", "demo"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert denied.returncode == 2
    assert "not authorized: principal User:auditor" in denied.stderr
    unknown = subprocess.run([frs, "--as", "nobody", "timeline", "x"], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "no profile 'nobody'" in unknown.stderr
    bad = subprocess.run([frs, "submit", "--purpose", "curiosity"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2


def test_restart_keeps_bus_and_state_together_and_refuses_a_reused_id(
        stack: Stack, up_env: dict[str, str], tmp_path: Path, installed_frs: Path) -> None:
    first_id = next(re.findall(r"timeline (demo-\d+)", step)[0] for step in stack.steps
                    if "timeline demo-" in step)
    _stop_up(stack.proc)
    again = _start_up(up_env, tmp_path / "up-again.log")
    try:
        assert any("resuming" in line for line in again.output) or \
            "resuming" in (tmp_path / "up-again.log").read_text()
        image = Path(up_env["FRS_UP_STATE"]) / "sample.jpg"
        reused = subprocess.run(
            [str(installed_frs), "--as", "upstream", "submit", "--image", str(image),
             "--case", "CASE-1", "--agent", "agent-7", "--purpose", "financial_fraud",
             "--roi", "ROI-1", "--source", "mug_shot", "--request-id", first_id, "--json"],
            cwd=tmp_path, env=_shell_env(again), capture_output=True, text=True, timeout=120)
        assert reused.returncode == 1, reused.stdout + reused.stderr
        assert "request_id_reused" in reused.stdout + reused.stderr
    finally:
        _stop_up(again.proc)
