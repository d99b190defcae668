"""What a person running a job sees: a line when a stage starts, progress with counts, rate and
ETA, and a closing summary; Ray's own INFO/WARNING chatter goes to the session's log files
(``AVER_VERBOSE=1``, or a job's ``--verbose``, brings it back to the terminal)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

VERBOSE_ENV = "AVER_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)`` as every job starts Ray (a local instance, or the cluster under ``ray
    job submit``). Unless verbose: Ray's loggers in this process, the C++ core's lines, Python
    warnings and whatever the workers write to stderr go to ``aver-driver.log`` among the session's
    logs; the workers' prints (aver's per-epoch lines, a stage's notes) still reach the terminal,
    without Ray's ``(pid=...)`` prefix; Ray Train and the workers log WARNING and above; Ray
    Data's own progress reporting is off (each stage reports its own)."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    if verbose():
        ray.init(**kwargs)
        return
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    loggers = _ray_loggers()
    for log in loggers:  # what ray.init logs before the session's folder exists waits here
        _replace_stream_handlers(log, held)
    kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
    ray.init(**kwargs)
    folder = logs_dir()
    handler: logging.Handler = logging.FileHandler(os.path.join(folder, "aver-driver.log")) if folder \
        else logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    held.setTarget(handler)
    held.flush()
    for log in loggers:
        _replace_stream_handlers(log, handler)
        log.removeHandler(held)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if folder:
        _core_logs_to(os.path.join(folder, "aver-driver-core.log"))
        _worker_stderr_to(handler)


def _ray_loggers() -> list[logging.Logger]:
    logging.captureWarnings(True)
    # "ray._private" too: ray.init replaces the "ray" logger's handlers with its own before it logs
    # its start-up lines, but leaves the children that have handlers of their own alone
    return [logging.getLogger(name) for name in ("ray", "ray._private", "ray.data", "ray.train", "ray.tune",
                                                 "py.warnings")]


def _replace_stream_handlers(log: logging.Logger, handler: logging.Handler) -> None:
    for h in list(log.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            log.removeHandler(h)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def logs_dir() -> str | None:
    """The Ray session's log folder on this machine (None before Ray starts)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()  # noqa: SLF001 - no public API
    except Exception:  # noqa: BLE001 - not started, or a client connection
        return None


def _worker_stderr_to(handler: logging.Handler) -> None:
    """Lines the workers print to stdout (aver's own: epoch metrics, a stage's notes) still reach
    the terminal; what they write to stderr (Ray's loggers, Python warnings) goes to ``handler``.
    Ray forwards both through one dispatcher whose printing handler is replaced here (no public API)."""
    from ray._private import worker as ray_worker

    log = logging.getLogger("aver.workers")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def forward(data: dict) -> None:
        if not data.get("is_err"):
            ray_worker.print_to_stdstream(data, ignore_prefix=True)
            return
        for line in data.get("lines", []):
            log.info("(%s pid=%s) %s", data.get("actor_name") or data.get("task_name") or "worker", data.get("pid"), line)

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("aver_print_logs", forward)


def _core_logs_to(path: str) -> None:
    """Ray's C++ core worker in this process writes its log lines straight to file descriptor 2
    (e.g. an "E" line each time Ray Train starts its PreemptionWatcher): point descriptor 2 at
    ``path`` and give Python's ``sys.stderr`` (tracebacks, progress bars) a copy of the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = os.fdopen(terminal, "w", buffering=1)


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Items done out of ``total`` with the rate and the time left: a tqdm bar on a terminal,
    otherwise (``ray job submit``, a log file) one line every ``every_s`` seconds and one at the end."""

    def __init__(self, what: str, total: int | None, unit: str = "inputs", every_s: float = 30.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True, leave=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            left = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
            return (f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %), "
                    f"{rate:.3g}/s{left}")
        return f"{self.what}: {self.done} {self.unit}, {rate:.3g}/s"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(), flush=True)

    def write(self, line: str) -> None:
        """A line above the bar (or just printed)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> float:
        """Ends the bar (or prints the final line); returns the seconds since the start."""
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            print(self.line(), flush=True)
        return time.monotonic() - self.started
