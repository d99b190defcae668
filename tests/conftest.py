import os
import secrets
import sys

import pytest

from aver.demo.s3proxy import local_s3

# Ray in the suite (inherited by every job and Ray cluster a test starts; Ray Train hands its
# settings on from the driver to its controller): Ray Train's controller polls its workers every
# 0.5 s, not 2 s (a run's end is seen sooner), and starts no spot-preemption watcher (one more
# actor process per run; nothing is preempted here). Jobs run by users keep Ray's defaults.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Each Ray node's log monitor globs its log folder for new files every 0.1 s until the folder holds
# 1000 of them, then every 0.5 s: the suite's clusters, whose folders fill with the logs of hundreds
# of short-lived workers, take the 0.5 s from the start (62 CPU-s of log monitors in one run).
# Lines of files already found are still read every 0.1 s.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# OpenMP's threads wait asleep, not spinning: the suite runs two test processes and their Ray
# workers on 2 CPUs, and torch's idle OpenMP threads spinning between parallel regions took the CPU
# from every other process (two 2-thread DenseNet forwards side by side: 8 CPU-s spinning, 2.3
# asleep; docs/testing.md). Set before torch loads anywhere in the suite, inherited by every job.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# glibc returns freed memory to the kernel at once by default, so every model call's activations are
# page-faulted in again (217k faults for 6 DenseNet batches; 7k with these): the suite's workers keep
# it for reuse (the documents' test alone: 396 -> 364 CPU-s). Inherited by every process started after.
for _name, _value in (("MALLOC_MMAP_THRESHOLD_", str(2**30)), ("MALLOC_TRIM_THRESHOLD_", str(2**30)),
                      ("MALLOC_TOP_PAD_", str(2**28))):
    os.environ.setdefault(_name, _value)

# pytest-xdist (--dist loadfile) hands modules out in collection order. The documented-commands
# test, the longest, goes first so the rest of the suite runs beside it rather than after it; the
# two-node modules go last, when it is done (a two-node cluster beside its Ray head and jobs once
# starved a local Ray's start-up past its timeout).
FIRST, LAST = ("tests/test_docs.py",), ("tests/pipelines/test_two_nodes.py", "tests/train/test_two_nodes.py")


def pytest_configure(config):
    # xdist >= 3.6 reorders modules by their number of tests unless told not to: the documents'
    # test (one long test) then started 8 minutes in and ran alone at the end.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        module = item.nodeid.split("::")[0]
        return 0 if module in FIRST else 2 if module in LAST else 1
    items.sort(key=rank)  # stable: the rest in collection order


@pytest.fixture(scope="session")
def s3():
    """A local S3 (moto_server on 127.0.0.1) with one bucket; yields fsspec storage options."""
    with local_s3("aver-test") as store:
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL=store["endpoint"])
        yield store
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the in-process job tests (2 CPUs, no dashboard)."""
    import ray

    from aver.pipelines.cluster import keep_task_workers
    from tests.ray_helpers import STARTUP_TIMED_OUT

    keep_task_workers()  # the local Ray a job starts
    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for it
            if STARTUP_TIMED_OUT not in str(e) or attempt == 2:
                raise
            _end_local_ray()
    yield
    _end_local_ray()


def _end_local_ray() -> None:
    import psutil
    import ray

    ours = _ray_processes()
    ray.shutdown()
    # A Ray Train controller still winding down when its raylet goes was seen to outlive it (an
    # orphan of init): end what is left of this Ray, and only of it.
    _, alive = psutil.wait_procs(ours, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _ray_processes() -> list:
    """The processes of the Ray this test session started (its GCS, raylet and their workers)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") or any(k in cmd for k in ("raylet", "gcs_server", "ray/_private", "ray/dashboard")):
            found.append(p)
    return found


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The demo corpus at size 'small' (seed 7) with its FEC images fetched, shared by the suite:
    written once per run, by the first xdist worker that asks (the others wait for it). Tests only
    read it (every job's caches and outputs go under their own output folder)."""
    from filelock import FileLock

    from aver.pipelines.fetch import FetchConfig, run as fetch
    from aver.demo.corpus import write_corpus

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.mktemp("small_corpus")
    else:  # the run's folder, above each worker's own
        root = tmp_path_factory.getbasetemp().parent / "small_corpus"
    with FileLock(str(root) + ".lock"):
        if not (root / ".written").exists():
            write_corpus(str(root), seed=7, size="small")
            fetch(FetchConfig(manifest=tuple(str(root / "fec" / f"faceexp-comparison-data-{split}-public.csv")
                                             for split in ("train", "test")), output=str(root / "fec"),
                              allow_file_urls=True))
            (root / ".written").touch()
    return root


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """A --model folder of untrained checkpoints (student, both VGGish, the three fusion variants):
    the scoring path's shapes, flags and bookkeeping do not depend on trained weights."""
    import torch

    from aver.models import FusionModel, Student, VGGishEmotion, save_checkpoint

    root = tmp_path_factory.mktemp("random_models")
    torch.manual_seed(0)
    save_checkpoint(Student().eval(), str(root / "student.pt"))
    for dim in ("arousal", "valence"):
        save_checkpoint(VGGishEmotion().eval(), str(root / f"vggish_{dim}.pt"))
    for name, modalities in (("fusion", ("visual", "audio")), ("fusion_visual", ("visual",)),
                             ("fusion_audio", ("audio",))):
        save_checkpoint(FusionModel(1920, 256, modalities=modalities).eval(), str(root / f"{name}.pt"))
    return root


@pytest.fixture(scope="module")
def ray_head(s3):
    """A Ray head started as on a cluster, for `ray job submit` (REFERENCES: token auth, the venv
    first on PATH): its own auth token, every port its own, one GPU declared that CUDA cannot reach
    (GPU actors are scheduled on it and fall back to the CPU), 4 logical CPUs on the 2 cores (the
    jobs' default shares fit), and the local S3 in its environment as an instance profile gives a
    node its credentials. Yields (dashboard address, environment, GCS address); only its own
    processes end.
    One per module that asks, ended with it: beside it, Ray Train's placement-group cleaner in an
    embedded Ray cannot tell which cluster to ask (its monitor thread stops; docs/decisions.md)."""
    import socket

    from tests.ray_helpers import ROOT, STARTUP_TIMED_OUT, ray_cli, stop_ray_cluster, submit_job, wait_for_jobs_api

    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_ENDPOINT_URL=s3["endpoint"], AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=ROOT)
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/aver-ray-{os.getpid()}"
    client = None  # the client server's port, once chosen (its process names no temp dir)
    try:
        for attempt in range(3):
            # Every port of its own, distinct (held open together while chosen): a Ray started earlier
            # in this session holds the fixed defaults (the job agent's 52365, the client server's
            # 10001), and an agent whose port was taken never serves ("No available agent to submit
            # job"): such a head is ended and started again on other ports.
            held = [socket.socket() for _ in range(4)]
            for sock in held:
                sock.bind(("", 0))
            gcs, dash, agent, client = (sock.getsockname()[1] for sock in held)
            for sock in held:
                sock.close()
            start = ray_cli(["start", "--head", "--num-cpus=4", "--num-gpus=1", f"--port={gcs}",
                             f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                             "--include-dashboard=true"], env, timeout=180)
            if start.returncode != 0 and STARTUP_TIMED_OUT in start.stdout + start.stderr:
                ready = start  # what the else reports if no start succeeds
                stop_ray_cluster(temp_dir, also=f"--port={client}")
                continue
            assert start.returncode == 0, start.stderr[-3000:]
            address = f"http://127.0.0.1:{dash}"
            wait_for_jobs_api(address, env)
            ready = submit_job(address, env, [sys.executable, "-c", "pass"], timeout=150)  # its job agent is up
            if ready.returncode == 0:
                break
            stop_ray_cluster(temp_dir, also=f"--port={client}")
        else:
            raise AssertionError(f"no Ray head took jobs in 3 starts: {(ready.stdout + ready.stderr)[-2000:]}")
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        stop_ray_cluster(temp_dir, also=client and f"--port={client}")
