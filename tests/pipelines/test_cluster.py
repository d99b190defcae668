"""`ray job submit` to a local head started here, as on a real cluster (REFERENCES: token auth,
the venv first on PATH). The head declares one GPU that CUDA may not reach (this machine has
none): GPU actors must be scheduled on it and run on CUDA or fall back to the CPU."""

import os
import secrets
import sys

import pytest

from aver.io.parts import read_folder
from aver.demo.s3proxy import free_port
from tests.media_fixtures import face_video
from tests.ray_helpers import ROOT, ray_cli, stop_ray_cluster, submit_job, wait_for_jobs_api

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def ray_head():
    # A token of our own: a fresh machine has no ~/.ray/auth_token, and the head refuses to start without one.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    temp_dir = f"/tmp/aver-ray-{os.getpid()}"
    dash = free_port()
    try:
        # Every port of its own: a Ray started earlier in this test session (ray.init() of another
        # test) holds the fixed defaults (the job agent's 52365, the client server's 10001); sharing
        # them leaves this head without a job agent ("No available agent to submit job").
        start = ray_cli(["start", "--head", "--num-cpus=2", "--num-gpus=1", f"--port={free_port()}",
                         f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
                         "--include-dashboard=true"], env, timeout=180)
        assert start.returncode == 0, start.stderr[-3000:]
        address = f"http://127.0.0.1:{dash}"
        wait_for_jobs_api(address, env)
        yield address, env
    finally:
        stop_ray_cluster(temp_dir)


@pytest.mark.timeout(420)
def test_ray_job_submit_extract_faces(tmp_path, ray_head):
    address, env = ray_head
    face_video(tmp_path / "in" / "v.mp4", seconds=1.0)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"junk")
    out = submit_job(address, env, [sys.executable, os.path.join(ROOT, "jobs", "extract_faces.py"), "--input",
                                    str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--cpus-per-actor", "0.5",
                                    "--actors", "1"])
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
    out = submit_job(address, env, [sys.executable, os.path.join(ROOT, "jobs", "score_videos.py"), "--input",
                                    str(inp), "--output", str(tmp_path / "out"), "--model", str(random_models),
                                    "--cpus-per-actor", "0.5", "--gpus-per-actor", "0.5"])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in out.stdout
    # scheduled on the GPU node (Ray handed it GPU 0): on CUDA where it works, else on the CPU
    assert ("Ray GPU ids [0] but CUDA is not available: falling back to CPU" in log
            or "on CUDA (Ray GPU ids [0])" in log)
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas()
    assert sorted(status["status"]) == ["corrupt", "ok"]
    assert read_folder(str(tmp_path / "out" / "scores")).num_rows == 30
    assert (tmp_path / "out" / "report" / "index.html").exists()


@pytest.mark.timeout(420)
def test_ray_job_submit_evaluate_on_gpu_actors_against_known_answers(tmp_path, ray_head, small_corpus):
    # Guards against: evaluate embedding every image in the driver and featurising sessions in one
    # CPU actor (both are pools of model actors taking the GPU share given, falling back to the CPU
    # where CUDA is out of reach), scoring the wrong FEC pair, or swapping arousal and valence.
    # FEC: every test triplet is rewritten so that its annotated pair is one picture twice, so the
    # right pair is always the closest (accuracy exactly 1) and any other never is (0). RECOLA: CCC
    # per column of a direct forward of the fusion model over the same windows.
    import csv
    import json

    import torch

    from aver.data.manifests import read_recola
    from aver.data.recola import SessionFeaturizer, SessionWindows
    from aver.metrics import ccc
    from aver.models import FusionModel, Student, VGGishEmotion, load_checkpoint, save_checkpoint

    address, env = ray_head
    data = tmp_path / "data"
    (data / "fec").mkdir(parents=True)
    for sub in ("affectnet", "recola"):
        (data / sub).symlink_to(small_corpus / sub)
    (data / "fec" / "images").symlink_to(small_corpus / "fec" / "images")
    name = "faceexp-comparison-data-test-public.csv"
    with open(small_corpus / "fec" / name) as f, open(data / "fec" / name, "w", newline="") as out:
        for row in csv.reader(f):
            row[5:10] = row[0:5]  # image 2 := image 1
            csv.writer(out).writerow(row[:16] + ["rater", "3"])  # image 3 is the odd one
    torch.manual_seed(1)
    models = tmp_path / "models"
    save_checkpoint(Student(), str(models / "student.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_arousal.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_valence.pt"))
    fusion = FusionModel(1920, 256)
    with torch.no_grad():
        fusion.head.weight.mul_(30)  # outputs that vary, so the two columns' CCCs differ clearly
    save_checkpoint(fusion, str(models / "fusion.pt"))
    out = submit_job(address, env, [sys.executable, os.path.join(ROOT, "jobs", "evaluate.py"), "--models", str(models),
                                    "--data", str(data), "--output", str(tmp_path / "eval"), "--window-s", "4.8",
                                    "--featurizer-cpus", "0.5", "--featurizer-gpus", "0.5"])
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for actor in ("evaluate", "SessionFeaturizer"):
        assert (f"{actor}: Ray GPU ids [0] but CUDA is not available: falling back to CPU" in log
                or f"{actor}: on CUDA (Ray GPU ids [0])" in log), actor
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["fec_triplet_accuracy"] == 1.0
    # the dev windows evaluate scored, cut again here from the session timelines it cached
    (features,) = (tmp_path / "eval" / "features").iterdir()
    c = SessionWindows(recola=str(data / "recola"), student=str(models / "student.pt"),
                       vggish_arousal=str(models / "vggish_arousal.pt"), vggish_valence=str(models / "vggish_valence.pt"),
                       window_s=4.8, features_cache=str(features))
    dev = [r for r in read_recola(c.recola).records if r["split"] == "dev"]
    windows = SessionFeaturizer(c)({k: [r[k] for r in dev] for k in dev[0]})
    fusion, _ = load_checkpoint(str(models / "fusion.pt"))
    with torch.no_grad():
        pred = fusion(torch.from_numpy(windows["visual"]), torch.from_numpy(windows["audio"])).numpy()
    target = windows["target"]
    for dim, col in (("arousal", 0), ("valence", 1)):
        right = ccc(target[:, col], pred[:, col])
        wrong = [ccc(target[:, col], pred[:, 1 - col]), ccc(target[:, 1 - col], pred[:, 1 - col])]
        assert all(abs(w - right) > 0.05 * abs(right) for w in wrong)  # so a swap would show
        assert metrics["ccc"][dim]["fused"] == pytest.approx(right, rel=1e-3)
