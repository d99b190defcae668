import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_module(name: str):
    """``jobs/<name>.py`` imported as module ``name`` (the scripts are not a package; each is loaded
    once per process, so a test can use its functions and dataclasses)."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "jobs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it runs
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # as an import that fails: the next test sees the error again
            raise
    return sys.modules[name]


def run_job(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python jobs/...`` as a user would (embedded local Ray in its own process)."""
    full_env = dict(os.environ, RAY_num_cpus="2", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def kill_midway(args: list[str], output, total: int, timeout: float = 240, tries: int = 3) -> int:
    """Start a job writing to ``output`` on this process's Ray (its driver joins the running cluster,
    as under ``ray job submit``: no Ray of its own to start) and SIGKILL the driver once 1 of
    ``total`` units is complete; returns how many were complete once Ray had ended what the driver
    left (its actors and task workers). A kill that lands too late (all complete: a busy machine) is
    tried again on a fresh output, so the test never depends on when the kill lands."""
    import shutil

    import ray

    status = os.path.join(str(output), "status")
    done = lambda: len([p for p in os.listdir(status) if p.endswith(".parquet") and not p.startswith(".")]) \
        if os.path.isdir(status) else 0  # noqa: E731
    address = ray.get_runtime_context().gcs_address
    for _ in range(tries):
        shutil.rmtree(str(output), ignore_errors=True)
        kill_when([*args, "--output", str(output)], lambda: done() >= 1, timeout=timeout, ray_address=address)
        if 1 <= done() < total:
            return done()
    raise AssertionError(f"the kill never landed midway in {tries} tries")


def kill_when(args: list[str], ready, timeout: float = 240, ray_address: str | None = None) -> None:
    """Start a job and SIGKILL its whole process group (driver and the local Ray it started) once
    ``ready()``. With ``ray_address`` (the cluster this process is connected to), the driver joins
    that cluster instead; this returns once Ray has seen the driver die and ended its actors, so
    nothing of it writes after the count."""
    env = dict(os.environ, PYTHONPATH=ROOT, **({"RAY_ADDRESS": ray_address} if ray_address else {}))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
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
        if ray_address:
            _wait_job_ended(proc.pid)
        time.sleep(1)


def _wait_job_ended(driver_pid: int, timeout: float = 60) -> None:
    """Until the Ray this process is connected to has marked the job of ``driver_pid`` dead and
    ended its actors (their workers with them)."""
    from ray._private import state

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = [j for j in state.jobs() if j["DriverPid"] == driver_pid]
        if not jobs:
            return  # killed before it joined: nothing of it runs
        ids = {j["JobID"] for j in jobs}
        if all(j["IsDead"] for j in jobs) and \
                not [a for a in state.actors().values() if a["JobID"] in ids and a["State"] != "DEAD"]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"Ray never ended the job of the killed driver {driver_pid}")


def stop_ray_cluster(temp_dir: str, also: str | None = None) -> None:
    """End the Ray cluster started with ``--temp-dir=temp_dir`` and only it: its processes name
    the folder on their command line, and its workers are their children (``ray stop`` would end
    every Ray process of the user). ``also``: an argument that names the rest of it (the client
    server's ``--port=N`` names no folder)."""
    import psutil

    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in me and any(temp_dir in arg or arg == also for arg in (p.info["cmdline"] or [])):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    family = {p.pid: p for p in roots}
    for p in roots:
        try:
            family.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in family.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


STARTUP_TIMED_OUT = "timed out during startup"
"""What `ray start` and `ray.init` say when their node was not in the GCS within 30 s (fixed in Ray's
node.py, no setting): on a machine busy with the rest of the suite a raylet once took longer. The
suite ends such a node and starts it again, at most twice more (start_ray_node, conftest's
ray_head and ray_local)."""


def start_ray_node(args: list[str], temp_dir: str, env: dict) -> None:
    """``ray start ARGS`` with its own temp dir and every port of its own: several nodes on one
    machine, and any Ray an earlier test left running, hold the defaults. A node that missed Ray's
    start-up wait (STARTUP_TIMED_OUT) is ended (its processes name ``temp_dir``) and started again."""
    from aver.demo.s3proxy import free_port

    for attempt in range(3):
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        r = ray_cli(["start", *args, *ports, f"--temp-dir={temp_dir}"], env, timeout=180)
        if r.returncode == 0 or STARTUP_TIMED_OUT not in r.stdout + r.stderr or attempt == 2:
            break
        stop_ray_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def ray_cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def wait_for_jobs_api(address: str, env: dict, timeout: float = 120) -> None:
    """Poll (bounded) until the head's job API answers: right after `ray start` it may not yet."""
    deadline = time.time() + timeout
    while True:
        r = ray_cli(["job", "list", "--address", address], env, timeout=60)
        if r.returncode == 0:
            return
        if time.time() > deadline:
            raise TimeoutError(f"the Ray head at {address} never accepted jobs: {(r.stdout + r.stderr)[-2000:]}")
        time.sleep(2)


def submit_job(address: str, env: dict, entrypoint: list[str], timeout: float = 360) -> subprocess.CompletedProcess:
    """`ray job submit` that waits while the head has no job agent yet ("No available agent to
    submit job"); nothing was submitted then, so trying again cannot run the job twice."""
    deadline = time.time() + timeout
    while True:
        r = ray_cli(["job", "submit", "--address", address, "--", *entrypoint], env,
                    timeout=max(30, deadline - time.time()))
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() > deadline - 60:
            return r
        time.sleep(3)


def same_rows(a, b, what: str) -> None:
    """Equal row sets (pandas, same order); floats (boxes, probabilities, targets, scores) to batching
    noise: model calls batch the crops and frames of several units together, so a rerun puts an
    input in other batches, and batched MTCNN / model outputs move by ~1e-6."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b), what
    for col in a.columns:
        if col == "error":
            continue
        x, y = a[col], b[col]
        if x.dtype.kind == "f":
            assert np.allclose(x, y, atol=1e-4, equal_nan=True), (what, col)
        elif x.map(lambda v: isinstance(v, np.ndarray)).any():
            for u, v in zip(x, y):
                assert (u is None and v is None) or np.allclose(np.asarray(u, float), np.asarray(v, float),
                                                                atol=1e-4), (what, col)
        else:
            assert x.equals(y), (what, col)


def unique_rows(uri, so, key):
    """A parts folder as a DataFrame sorted by ``key``, asserting no key appears twice."""
    from aver.io.parts import read_folder

    table = read_folder(uri, so).to_pandas()
    assert not table.duplicated(key).any()
    return table.sort_values(key).reset_index(drop=True)


def count_driver_bytes(stop: bool = False) -> list[int]:
    """Count, in this process, the bytes (pickled) of what aver's own code receives from the
    cluster: every batch a dataset iterator hands it and every ``ray.get`` it calls (Ray Data's own
    calls inside the iterator are not counted twice). Returns the list the sizes are appended to;
    ``stop`` puts Ray's functions back."""
    import pickle

    import ray
    import ray.data

    import aver

    real = getattr(count_driver_bytes, "real", None)
    if stop:
        if real:
            ray.data.Dataset.iter_batches, ray.get = real
            del count_driver_bytes.real
        return []
    if real is None:
        count_driver_bytes.real = real = (ray.data.Dataset.iter_batches, ray.get)
    real_iter, real_get = real
    package = os.path.dirname(os.path.abspath(aver.__file__)) + os.sep
    got: list[int] = []

    def iter_batches(self, *a, **k):
        for batch in real_iter(self, *a, **k):
            got.append(len(pickle.dumps(batch)))
            yield batch

    def get(refs, *a, **k):
        out = real_get(refs, *a, **k)
        if os.path.abspath(sys._getframe(1).f_code.co_filename).startswith(package):
            got.append(len(pickle.dumps(out)))
        return out

    ray.data.Dataset.iter_batches, ray.get = iter_batches, get
    return got
