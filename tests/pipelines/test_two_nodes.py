"""The batch jobs on a real two-node Ray cluster on this machine: a head with CPUs only and a node
that declares a GPU (CUDA cannot reach it here, so the models fall back to the CPU), each node
with its own --temp-dir and ports; inputs, checkpoints and outputs on a local S3 (moto), as on a
cluster whose nodes share no disk. The jobs run as drivers connected to the head (RAY_ADDRESS).

What this shows: outputs exactly once; load/stage-out tasks on the CPU-only head and the model actors
only on the GPU node (Ray's state API); a GPU pool that starts with no GPU in the cluster grows
when the GPU node joins; the GPU node's raylet killed mid-run, the node restarted and the job
rerun: the rows equal an uninterrupted run's."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from aver.io.parts import read_folder
from aver.demo.s3proxy import free_port
from tests.media_fixtures import face_images, face_video
from tests.ray_helpers import ROOT, same_rows, start_ray_node, stop_ray_cluster, unique_rows

BIN = os.path.dirname(sys.executable)


class TwoNodes:
    """A head (CPUs only, dashboard for the state API) and GPU nodes added and killed at will."""

    def __init__(self, head_cpus: int = 2) -> None:
        # No token authentication (tests/test_docs.py covers it): this process reads
        # the state API too, and nothing outside 127.0.0.1 reaches these ports.
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dirs: list[str] = []
        self.gpu_temp: str | None = None
        port, dash = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        try:
            self._start(["--head", f"--num-cpus={head_cpus}", "--num-gpus=0", f"--port={port}", "--include-dashboard=true",
                         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--ray-client-server-port={free_port()}"], "head")
            self._wait_nodes(1)
            self.head_id = self.alive_nodes()[0]["node_id"]
        except BaseException:  # a head that never became ready is still ours to end
            self.shutdown()
            raise

    def _start(self, args: list[str], name: str) -> str:
        temp_dir = f"/tmp/aver-2n-{os.getpid()}-{name}-{len(self.temp_dirs)}"
        self.temp_dirs.append(temp_dir)
        start_ray_node(args, temp_dir, self.env)
        return temp_dir

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, detail=True) if n["state"] == "ALIVE"]

    def _wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if len(self.alive_nodes()) == n:
                    return
            except Exception:  # noqa: BLE001 - the dashboard is not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"the cluster never had {n} alive nodes")

    def add_gpu_node(self, cpus: int = 1) -> str:
        """Start a node declaring GPUs and wait until it has joined; returns its node id."""
        before = {n["node_id"] for n in self.alive_nodes()}
        self.gpu_temp = self._start([f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=2"], "gpu")
        self._wait_nodes(len(before) + 1)
        return next(n["node_id"] for n in self.alive_nodes() if n["node_id"] not in before)

    def kill_gpu_raylet(self) -> None:
        """SIGKILL the GPU node's raylet (a node lost mid-run), then end what is left of that node."""
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and self.gpu_temp in cmd:
                p.send_signal(signal.SIGKILL)
        stop_ray_cluster(self.gpu_temp)

    def run_job(self, args: list[str], **kw) -> subprocess.Popen:
        env = dict(self.env, RAY_ADDRESS=self.address, PYTHONPATH=ROOT)
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)

    def placement(self) -> dict[str, set[str]]:
        """``{task or actor name: node ids}`` of everything the cluster ran so far."""
        from ray.util.state import list_actors, list_tasks

        where: dict[str, set[str]] = {}
        for t in list_tasks(address=self.dashboard, detail=True, limit=10000, raise_on_missing_output=False):
            if t.get("node_id"):
                where.setdefault(t["name"], set()).add(t["node_id"])
        for a in list_actors(address=self.dashboard, detail=True, limit=10000, raise_on_missing_output=False):
            if a.get("node_id"):
                where.setdefault(f"actor:{a['class_name']}:{a.get('repr_name') or a.get('name') or ''}",
                                 set()).add(a["node_id"])
        return where

    def actor_count(self, name: str) -> int:
        from ray.util.state import list_actors

        return sum(1 for a in list_actors(address=self.dashboard, detail=True, limit=10000)
                   if name in (a.get("repr_name") or "") + a["class_name"])

    def shutdown(self) -> None:
        for temp_dir in reversed(self.temp_dirs):
            stop_ray_cluster(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    nodes = TwoNodes()
    try:
        yield nodes
    finally:
        nodes.shutdown()


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out
    return proc.returncode, out


def _status_parts(fs, uri: str) -> int:
    fs.invalidate_cache()
    try:
        return sum(1 for p in fs.ls(uri, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def s3_inputs(s3, tmp_path_factory):
    """Face images, two teachers and the score models on S3."""
    import fsspec

    from aver.models import FusionModel, Student, Teacher, VGGishEmotion, save_checkpoint

    fs = fsspec.filesystem("s3", **s3["options"])
    local = tmp_path_factory.mktemp("two_nodes")
    bucket = f"s3://{s3['bucket']}/two-nodes"
    face_images(local / "images", 12)
    _faces_parts(local / "faces", local / "images")
    for i in range(2):
        face_video(local / "videos" / f"talk{i}.mp4", seconds=1.2)
    torch.manual_seed(0)
    save_checkpoint(Teacher(d_face=128).eval(), str(local / "teachers" / "t128.pt"))
    save_checkpoint(Teacher(d_face=256).eval(), str(local / "teachers" / "t256.pt"))
    save_checkpoint(Student().eval(), str(local / "models" / "student.pt"))
    for dim in ("arousal", "valence"):
        save_checkpoint(VGGishEmotion().eval(), str(local / "models" / f"vggish_{dim}.pt"))
    save_checkpoint(FusionModel(1920, 256).eval(), str(local / "models" / "fusion.pt"))
    for folder in ("images", "faces", "videos", "teachers", "models"):
        for path in sorted(glob.glob(str(local / folder / "*"))):
            fs.put(path, f"{bucket}/{folder}/{os.path.basename(path)}")
    return {"bucket": bucket, "so": s3["options"], "fs": fs}


def _faces_parts(folder, images) -> None:
    """12 faces/ parts (extract_faces' output) of 4 crops each, made of the face images."""
    import pyarrow as pa

    from aver.io.parts import write_table
    from aver.pipelines.extract import FACES_SCHEMA

    crops = [open(p, "rb").read() for p in sorted(glob.glob(str(images / "*.jpg")))]
    for v in range(12):
        rows = [{"video_id": f"v{v:02d}", "source": f"v{v:02d}.mp4", "crop_id": f"v{v:02d}-{i:07d}", "frame_index": i,
                 "timestamp_s": i / 5, "track_id": 0, "box": [0.0, 0.0, 120.0, 120.0], "prob": 0.99,
                 "crop": crops[(v + i) % len(crops)]} for i in range(4)]
        write_table(str(folder / f"v{v:02d}.parquet"), pa.Table.from_pylist(rows, schema=FACES_SCHEMA))


def _distill_args(inp, output: str, source: str = "faces", **flags) -> list[str]:
    """distill on the faces parts in slices of 2 crops (each part staged in two segments), or on the images."""
    args = ["jobs/distill.py", "--input", f"{inp['bucket']}/{source}/", "--teachers", f"{inp['bucket']}/teachers/t128.pt",
            f"{inp['bucket']}/teachers/t256.pt", "--output", output, "--storage-options", json.dumps(inp["so"]),
            "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--records-per-call", "1"]
    flags = {"images_per_unit": 2 if source == "faces" else 1, **flags}
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _model_actors(where: dict[str, set[str]], name: str) -> set[str]:
    nodes = [n for key, n in where.items() if key.startswith("actor:") and name in key]
    assert nodes, f"no {name} actor in the state API: {sorted(where)}"
    return set().union(*nodes)


def _cpu_task_nodes(where: dict[str, set[str]], stage: str) -> set[str]:
    nodes = [n for key, n in where.items() if not key.startswith("actor:") and stage in key]
    assert nodes, f"no {stage} task in the state API: {sorted(where)}"
    return set().union(*nodes)


@pytest.mark.timeout(600)
def test_gpu_pool_waits_for_the_gpu_node_then_cpu_stages_run_anywhere_and_models_on_the_gpu(cluster, s3_inputs):
    inp, fs = s3_inputs, s3_inputs["fs"]
    out = f"{inp['bucket']}/distill-first"
    job = cluster.run_job(_distill_args(inp, out))
    # Guards against: a pool sized from the CPUs at start (a GPU job on a head without GPUs ran its
    # models on CPU actors and never used the GPU nodes that joined later).
    deadline = time.time() + 120  # until the job's CPU stage has run: the pool had its chance to start
    while time.time() < deadline and job.poll() is None and not any("_load_stage" in k for k in cluster.placement()):
        time.sleep(1)
    time.sleep(2)
    assert job.poll() is None and _status_parts(fs, f"{out}/status") == 0, "ran without a GPU in the cluster"
    gpu_node = cluster.add_gpu_node()
    rc, log = _finish(job)
    assert rc == 0, log[-4000:]
    assert "distill: ok=12" in log
    targets = unique_rows(f"{out}/targets", inp["so"], ["crop_id"])  # no crop twice
    assert len(targets) == 12 * 4 and np.allclose(np.linalg.norm(np.stack(targets["target"])[:, :32], axis=1), 1, atol=1e-4)
    where = cluster.placement()
    assert _model_actors(where, "TeacherPair") == {gpu_node}  # the models only where the GPU is
    # from no actor (no GPU in the cluster) to actors on the node that joined; how far past one it
    # grows is Ray Data's autoscaler's call (busy actors and queued work), not a fixed count
    assert 1 <= cluster.actor_count("TeacherPair") <= 2
    assert cluster.head_id in _cpu_task_nodes(where, "_load_stage")  # CPU stages on the CPU-only head too
    assert cluster.head_id in _cpu_task_nodes(where, "_stage_out")
    _assert_no_staging(fs, out)


@pytest.mark.timeout(300)
def test_local_paths_are_refused_on_two_nodes(cluster, s3_inputs, tmp_path):
    # Guards against: a local --output on a multi-node cluster (each node writes its own disk, and
    # reruns cannot see what other nodes wrote). With --shared-fs the same paths are accepted: the
    # score_videos test below writes to a local folder so.
    inp = s3_inputs
    if len(cluster.alive_nodes()) < 2:
        cluster.add_gpu_node()
    rc, log = _finish(cluster.run_job(_distill_args(inp, str(tmp_path / "out"), "images")), timeout=120)
    assert rc != 0 and f"--output {tmp_path / 'out'}: local path on a Ray cluster of 2 nodes" in log
    assert "--shared-fs" in log and not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.timeout(600)
def test_score_videos_on_two_nodes_writes_each_input_once_to_a_shared_folder(cluster, s3_inputs, tmp_path):
    inp = s3_inputs
    if len(cluster.alive_nodes()) < 2:
        cluster.add_gpu_node()
    gpu_nodes = {n["node_id"] for n in cluster.alive_nodes()} - {cluster.head_id}
    out = str(tmp_path / "score")  # a local folder both nodes see (one machine): accepted with --shared-fs
    job = cluster.run_job(["jobs/score_videos.py", "--input", f"{inp['bucket']}/videos/", "--model",
                           f"{inp['bucket']}/models", "--output", out, "--storage-options", json.dumps(inp["so"]),
                           "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--shared-fs"])
    rc, log = _finish(job)
    assert rc == 0, log[-4000:]
    assert "score_videos: ok=2" in log
    scores = unique_rows(f"{out}/scores", {}, ["video_id", "track_id", "t_end_s"])
    # 1.2 s: steps at 0.4, 0.8, 1.2 s, each with the face's row and the soundtrack's
    assert len(scores) == 2 * (3 + 3) and scores["video_id"].nunique() == 2
    assert len(read_folder(f"{out}/status")) == 2
    assert _model_actors(cluster.placement(), "VideoScorer") <= gpu_nodes


@pytest.mark.timeout(900)
def test_gpu_node_killed_mid_run_then_rerun_equals_uninterrupted(cluster, s3_inputs):
    inp, fs = s3_inputs, s3_inputs["fs"]
    if len(cluster.alive_nodes()) < 2:
        cluster.add_gpu_node()
    clean = f"{inp['bucket']}/distill-first"  # the uninterrupted run of the first test, same flags
    if _status_parts(fs, f"{clean}/status") != 12:
        clean = f"{inp['bucket']}/distill-clean"
        rc, log = _finish(cluster.run_job(_distill_args(inp, clean)))
        assert rc == 0, log[-4000:]
    for attempt in range(3):
        out = f"{inp['bucket']}/distill-killed-{attempt}"
        job = cluster.run_job(_distill_args(inp, out))
        deadline = time.time() + 240
        while time.time() < deadline and job.poll() is None and _status_parts(fs, f"{out}/status") < 1:
            time.sleep(0.2)
        cluster.kill_gpu_raylet()
        done = _status_parts(fs, f"{out}/status")
        cluster.add_gpu_node()
        rc, log = _finish(job, timeout=240)  # it may finish on the new node, fail, or hang: the rerun decides
        print(f"killed run: {done} units complete at the kill, exit {rc}: {log.strip().splitlines()[-1:]}")
        if 1 <= done < 12:
            break
    else:
        pytest.fail("the kill never landed mid-run")
    rc, log = _finish(cluster.run_job(_distill_args(inp, out)))
    assert rc == 0, log[-4000:]
    for folder, key in (("targets", ["crop_id"]), ("status", ["item_id"])):
        same_rows(unique_rows(f"{clean}/{folder}", inp["so"], key), unique_rows(f"{out}/{folder}", inp["so"], key), folder)
    assert len(read_folder(f"{out}/targets", inp["so"])) == 12 * 4
    _assert_no_staging(fs, out)


def _assert_no_staging(fs, out: str) -> None:
    """A finished run leaves nothing in its staging area (segments of units in two slices each)."""
    fs.invalidate_cache()
    left = fs.find(f"{out}/_staging") if fs.exists(f"{out}/_staging") else []
    assert not left, left


@pytest.mark.timeout(900)
def test_a_long_video_is_read_on_both_nodes_and_a_killed_run_rereads_only_its_uncommitted_clips(
        cluster, s3_inputs, tmp_path):
    # Guards against (issue 28): a long video read by one task on one node, a clipped run whose
    # rows differ from a whole read, a rerun after a kill that reads committed clips again or
    # writes a row twice.
    from tests.pipelines.test_clips import long_take

    inp, fs = s3_inputs, s3_inputs["fs"]
    if len(cluster.alive_nodes()) < 2:
        cluster.add_gpu_node()
    long_take(tmp_path / "take.mp4", seconds=8.0)
    fs.put(str(tmp_path / "take.mp4"), f"{inp['bucket']}/long/take.mp4")

    def args(out: str, clip_s: float) -> list[str]:
        # load tasks of half a CPU: the GPU node (1 CPU, half of it the model actor's) reads clips too
        return ["jobs/score_videos.py", "--input", f"{inp['bucket']}/long/", "--model", f"{inp['bucket']}/models",
                "--output", f"{inp['bucket']}/{out}", "--storage-options", json.dumps(inp["so"]),
                "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--cpus-per-task", "0.5",
                "--records-per-call", "1", "--clip-s", str(clip_s)]

    key = ["video_id", "track_id", "t_end_s"]
    for out, clip_s in (("long-whole", 0), ("long-clips", 0.8)):
        rc, log = _finish(cluster.run_job(args(out, clip_s)))
        assert rc == 0 and "score_videos: ok=1" in log, log[-4000:]
    assert "1 long inputs in 11 clips; 11 to read, 0 read before" in log  # 10 clips of 0.8 s and the audio
    whole = unique_rows(f"{inp['bucket']}/long-whole/scores", inp["so"], key)
    same_rows(whole, unique_rows(f"{inp['bucket']}/long-clips/scores", inp["so"], key), "scores")
    clips = read_folder(f"{inp['bucket']}/long-clips/clips", inp["so"]).to_pandas()
    assert len(clips) == 11 and set(clips["node_id"]) == {n["node_id"] for n in cluster.alive_nodes()}

    for attempt in range(3):
        out = f"long-killed-{attempt}"
        job = cluster.run_job(args(out, 0.8))
        folder = f"{inp['bucket']}/{out}/_clips/take-"
        deadline = time.time() + 240
        done: list[str] = []
        while time.time() < deadline and job.poll() is None and len(done) < 3:
            fs.invalidate_cache()
            done = [p for p in fs.glob(f"{folder}*/*.done")]
            time.sleep(0.2)
        cluster.kill_gpu_raylet()
        os.killpg(job.pid, signal.SIGKILL)  # the driver goes too: what it left is what a rerun finds
        job.communicate()
        fs.invalidate_cache()
        done = fs.glob(f"{folder}*/*.done")
        cluster.add_gpu_node()
        print(f"killed run: {len(done)} of 11 clips committed")
        if 1 <= len(done) < 11 and _status_parts(fs, f"{inp['bucket']}/{out}/status") == 0:
            break
    else:
        pytest.fail("the kill never landed mid-video")
    rc, log = _finish(cluster.run_job(args(out, 0.8)))
    assert rc == 0 and "score_videos: ok=1" in log, log[-4000:]
    assert f"1 long inputs in 11 clips; {11 - len(done)} to read, {len(done)} read before" in log
    clips = read_folder(f"{inp['bucket']}/{out}/clips", inp["so"]).to_pandas()
    assert sorted(clips["run_id"].value_counts().tolist()) == sorted([len(done), 11 - len(done)])
    same_rows(whole, unique_rows(f"{inp['bucket']}/{out}/scores", inp["so"], key), "scores")
    assert len(read_folder(f"{inp['bucket']}/{out}/status", inp["so"])) == 1
    fs.invalidate_cache()
    assert not fs.glob(f"{inp['bucket']}/{out}/_clips/**/*.pkl")  # the input's clips went with its commit
