"""`ray job submit` to a local head started here, as on a real cluster (REFERENCES: token auth,
the venv first on PATH). Runs before any in-process Ray of the suite exists: `ray stop` stops
every Ray process of this user. The head declares one GPU that CUDA cannot reach (this machine has
none): GPU actors must be scheduled on it and fall back to the CPU."""

import os
import subprocess
import sys

import pytest

from aver.outputs import read_folder
from tests.conftest import _free_port
from tests.media_fixtures import face_video
from tests.ray_helpers import ROOT

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def ray_head():
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    dash = _free_port()
    start = subprocess.run(
        [os.path.join(BIN, "ray"), "start", "--head", "--num-cpus=2", "--num-gpus=1", f"--port={_free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.timeout(420)
def test_ray_job_submit_extract_faces(tmp_path, ray_head):
    address, env = ray_head
    face_video(tmp_path / "in" / "v.mp4", seconds=1.0)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"junk")
    out = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--",
         sys.executable, os.path.join(ROOT, "jobs", "extract_faces.py"), "--input", str(tmp_path / "in"),
         "--output", str(tmp_path / "out"), "--cpus-per-actor", "0.5", "--actors", "1"],
        env=env, capture_output=True, text=True, timeout=360)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "succeeded" in out.stdout
    assert "corrupt=1, ok=1" in out.stdout
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas()
    assert sorted(status["status"]) == ["corrupt", "ok"]
    assert read_folder(str(tmp_path / "out" / "faces")).num_rows == 5


@pytest.mark.timeout(420)
def test_ray_job_submit_score_videos_on_a_gpu_node_without_cuda(tmp_path, ray_head, small_corpus, random_models):
    address, env = ray_head
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("interview.mp4", "broken.mp4"):
        (inp / name).write_bytes((small_corpus / "archive" / name).read_bytes())
    out = subprocess.run(
        [os.path.join(BIN, "ray"), "job", "submit", "--address", address, "--",
         sys.executable, os.path.join(ROOT, "jobs", "score_videos.py"), "--input", str(inp),
         "--output", str(tmp_path / "out"), "--model", str(random_models), "--cpus-per-actor", "0.5",
         "--gpus-per-actor", "0.5"],
        env=env, capture_output=True, text=True, timeout=360)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in out.stdout
    # scheduled on the GPU node (Ray handed it GPU 0), then ran on the CPU because CUDA is absent
    assert "Ray GPU ids [0] but CUDA is not available: falling back to CPU" in log
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas()
    assert sorted(status["status"]) == ["corrupt", "ok"]
    assert read_folder(str(tmp_path / "out" / "scores")).num_rows == 30
    assert (tmp_path / "out" / "report" / "index.html").exists()
