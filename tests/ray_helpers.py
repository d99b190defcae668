import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python jobs/...`` as a user would (embedded local Ray in its own process)."""
    full_env = dict(os.environ, RAY_num_cpus="2", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def kill_when(args: list[str], ready, timeout: float = 240) -> None:
    """Start a job and SIGKILL its whole process group (driver and local Ray) once ``ready()``."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.05)
    finally:
        import psutil

        try:  # the driver and every process of the local Ray cluster it started
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        time.sleep(1)
