"""Image work out of process: every probe image is decoded, sanitized and assessed in a
small pool of long-lived worker processes under resource limits, never on the intake's
event loop and never in the intake's own address space.

A worker is confined when it starts: ``RLIMIT_AS`` caps its address space at its size at
start plus ``memory_mb`` (an allocation past it fails: ``MemoryError``), ``RLIMIT_CPU`` is
re-armed before each image at the CPU time used so far plus ``cpu_seconds`` (past it the
kernel sends SIGXCPU, whose default action ends the process), and ``RLIMIT_CORE`` is 0 so
a killed worker leaves no core file holding image bytes. The image reaches the worker only
through its pipe, never through a file. A worker that used too much is gone; the image is
refused with ``decode_limit_exceeded`` and a new worker takes the slot. A worker retires
after ``max_images`` images, after a memory failure, or when its resident memory has
grown more than ``RECYCLE_GROWTH_MB`` since it started, so the memory a large or unusual
image left behind goes back to the system instead of staying with the service.

Each slot (one thread, one worker) runs one image at a time, so a worker that dies takes
only its own image with it: unlike ``ProcessPoolExecutor``, where one dead worker breaks
the pool and fails every image in flight. Workers come from a ``forkserver`` that has
imported this module (Pillow, OpenCV, numpy, LiteRT) once: a new worker costs a fork, not
an import, and forking never copies the intake's threads or sockets."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import queue
import resource
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, fields
from functools import cache
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, ForkServerProcess
from typing import Any, TypeVar

import cv2
from prometheus_client import Counter

from schemas.events import QualityReport
from services.intake.quality import QualityGate, assess, warm_up
from services.intake.sanitize import CleanImage, SanitizeError, SanitizeLimits, sanitize
from services.kit.cost import collect, step

log = logging.getLogger("frs.intake")

T = TypeVar("T")

DEFAULT_WORKERS = 2
DEFAULT_CPU_SECONDS = 10  # a 49 MP JPEG, the largest the caps let in, takes ~2.3 s
DEFAULT_MEMORY_MB = 1024  # ...and ~700 MB of address space above the worker's start
DEFAULT_MAX_IMAGES = 200
# A worker whose resident memory grew more than this since it started retires: a worker
# settles ~20 MB above its start after its first probes; a 30 MP image can leave 60 MB.
# Two workers at most 32 MB up keep the intake within ~20% of its ~325 MB at rest.
RECYCLE_GROWTH_MB = 32


@dataclass(frozen=True)
class WorkerLimits:
    cpu_seconds: int = DEFAULT_CPU_SECONDS
    memory_mb: int = DEFAULT_MEMORY_MB
    max_images: int = DEFAULT_MAX_IMAGES
    # A worker stuck without using CPU is ended by the wall clock instead; by default at
    # 4 x cpu_seconds + 10 s, room for a loaded machine.
    wall_seconds: float | None = None

    @property
    def wall_limit_s(self) -> float:
        return self.wall_seconds or self.cpu_seconds * 4 + 10.0


class DecodeLimitExceeded(Exception):
    """The image needed more CPU time or memory than a worker may use, or its worker
    died on it. ``limit`` is one of: cpu_time, memory, wall_time, crashed."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(f"{limit}: {detail}")
        self.limit = limit
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (DecodeLimitExceeded, (self.limit, self.detail))


@dataclass(frozen=True)
class Examined(CleanImage):
    """What the intake needs of a sanitized image: its clean bytes and digests and the
    quality report. The decoded pixels stay in the worker."""

    quality: QualityReport
    # CPU seconds by step (services/kit/cost.py) spent on it in the worker, for the
    # intake to count: the worker's own counters are never scraped.
    cpu: tuple[tuple[str, float], ...] = ()


def _out_of_memory() -> DecodeLimitExceeded:
    return DecodeLimitExceeded("memory", "decoding the image needed more memory than an "
                               "image worker may use")


def examine(data: bytes, limits: SanitizeLimits, gate: QualityGate) -> Examined | SanitizeError:
    """Sanitize and assess one image: the whole image work, one round trip to a worker.
    A refusal is returned; running out of the worker's memory raises
    ``DecodeLimitExceeded``."""
    try:
        with collect() as spent:
            try:
                with step("decode"):  # re-encoding is its own step inside
                    clean = sanitize(data, limits)
            except SanitizeError as err:
                return err
            with step("detect"):
                report = assess(clean.image, gate)
    except MemoryError:
        raise _out_of_memory() from None
    except cv2.error as exc:
        if exc.code == cv2.Error.StsNoMem:  # OpenCV's failed allocation
            raise _out_of_memory() from None
        raise
    kept = {f.name: getattr(clean, f.name) for f in fields(CleanImage)}
    return Examined(**kept, quality=report, cpu=tuple(spent.items()))


# --- the worker process -------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _confine(limits: WorkerLimits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # OpenCV's own threads would only contend with the other workers for the cores.
    cv2.setNumThreads(1)
    warm_up()  # the face detector, loaded before the cap and before the first image
    cap = _status_kb("VmSize") * 1024 + limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # Stopping is the intake's call (it closes the pipe): a Ctrl-C or SIGTERM sent to the
    # whole process group must not kill a worker mid-image, which would refuse the image.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _arm_cpu(seconds: int) -> None:
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime) + 1
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    # Only the soft limit moves: a hard limit could never be raised again for the next
    # image. Past the soft limit the kernel sends SIGXCPU, whose default action is to end
    # the process.
    soft = spent + seconds if hard == resource.RLIM_INFINITY else min(spent + seconds, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _reply(fn: Callable[..., object], args: tuple[Any, ...]) -> tuple[bool, object]:
    try:
        return True, fn(*args)
    except MemoryError:
        return False, _out_of_memory()
    except Exception as exc:  # handed back to the caller, as an executor would
        try:
            pickle.dumps(exc)
        except Exception:
            return False, RuntimeError(f"{type(exc).__name__} in an image worker")
        return False, exc


def _serve(conn: Connection, limits: WorkerLimits) -> None:
    """A worker's life: confine itself, then one call at a time until told to stop, the
    pipe closes, or it retires."""
    _confine(limits)
    start_rss = _status_kb("VmRSS")
    for served in range(1, limits.max_images + 1):
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the intake is gone
        if task is None:
            return
        fn, args = task
        _arm_cpu(limits.cpu_seconds)
        ok, value = _reply(fn, args)
        del task, fn, args
        retire = (served == limits.max_images
                  or isinstance(value, DecodeLimitExceeded)
                  or _status_kb("VmRSS") - start_rss > RECYCLE_GROWTH_MB * 1024)
        conn.send((ok, value, retire))
        if retire:
            return


# --- the pool, in the intake ---------------------------------------------------------

@cache
def _ended() -> Counter:
    return Counter("frs_intake_image_workers_ended_total",
                   "Image worker processes ended, by cause: recycled, or a limit it hit "
                   "(cpu_time, memory, wall_time) or crashed.", ["cause"])


@dataclass
class _Task:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class _WorkerDied(Exception):
    def __init__(self, limit: str, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit
        self.detail = detail


class _Worker:
    def __init__(self, ctx: ForkServerContext, limits: WorkerLimits, name: str) -> None:
        self.limits = limits
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc: ForkServerProcess = ctx.Process(target=_serve, args=(child, limits),
                                                   name=name, daemon=True)
        self.proc.start()
        child.close()

    def call(self, task: _Task) -> tuple[bool, object, bool]:
        try:
            self.conn.send((task.fn, task.args))
            if not self.conn.poll(self.limits.wall_limit_s):
                self.proc.kill()
                self.proc.join()
                raise _WorkerDied("wall_time", "the image worker did not finish within "
                                  f"{self.limits.wall_limit_s:g} s")
            ok, value, retire = self.conn.recv()
        except (EOFError, OSError):
            raise self._death() from None
        return ok, value, retire

    def _death(self) -> _WorkerDied:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code == -signal.SIGXCPU:
            return _WorkerDied("cpu_time", "decoding the image took more than "
                               f"{self.limits.cpu_seconds} s of CPU time")
        return _WorkerDied("crashed", f"the image worker died on the image (exit {code})")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc.close()


class DecoderPool(Executor):
    """An executor whose calls run in worker processes under ``WorkerLimits``. A call whose
    worker hit a limit or died fails with ``DecodeLimitExceeded``; every other call goes
    on. ``fn`` and its arguments must pickle (a module-level function)."""

    def __init__(self, workers: int = DEFAULT_WORKERS,
                 limits: WorkerLimits | None = None) -> None:
        self.limits = limits or WorkerLimits()
        ctx = multiprocessing.get_context("forkserver")
        assert isinstance(ctx, ForkServerContext)
        # The forkserver imports this module once; every worker is a fork of it.
        ctx.set_forkserver_preload([__name__])
        self._ctx = ctx
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._slots = [threading.Thread(target=self._slot, args=(i,), daemon=True,
                                        name=f"intake-image-{i}") for i in range(workers)]
        for slot in self._slots:
            slot.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            raise TypeError("DecoderPool.submit takes positional arguments only")
        with self._lock:
            if self._closed:
                raise RuntimeError("the image worker pool is shut down")
            future: Future[T] = Future()
            self._tasks.put(_Task(future, fn, args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        task = self._tasks.get_nowait()
                    except queue.Empty:
                        break
                    if task is not None:
                        task.future.cancel()
            for _ in self._slots:
                self._tasks.put(None)
        if wait:
            for slot in self._slots:
                slot.join()

    def _spawn(self, index: int) -> _Worker | None:
        try:
            return _Worker(self._ctx, self.limits, f"intake-image-{index}")
        except Exception as exc:  # tried again for the next image
            log.error("cannot start an image worker", extra={"error": str(exc)[:300]})
            return None

    def _slot(self, index: int) -> None:
        # Started before the first image needs it, and again as soon as one ends, so an
        # image seldom waits for a worker to start.
        worker = self._spawn(index)
        while True:
            task = self._tasks.get()
            if task is None:
                break
            if not task.future.set_running_or_notify_cancel():
                continue
            worker = worker or self._spawn(index)
            if worker is None:
                task.future.set_exception(RuntimeError("no image worker could be started"))
                continue
            try:
                ok, value, retire = worker.call(task)
            except _WorkerDied as died:
                task.future.set_exception(DecodeLimitExceeded(died.limit, died.detail))
                # Its pid and cause only: nothing of the image is logged.
                log.warning("image worker ended by a limit",
                            extra={"limit": died.limit, "worker_pid": worker.proc.pid})
                _ended().labels(died.limit).inc()
                worker.stop()
                worker = self._spawn(index)
                continue
            if ok:
                task.future.set_result(value)
            else:
                assert isinstance(value, BaseException)
                task.future.set_exception(value)
            if retire:
                cause = value.limit if isinstance(value, DecodeLimitExceeded) else "recycled"
                if cause != "recycled":
                    log.warning("image worker ended by a limit",
                                extra={"limit": cause, "worker_pid": worker.proc.pid})
                _ended().labels(cause).inc()
                worker.stop()
                worker = self._spawn(index)
        if worker is not None:
            worker.stop()
