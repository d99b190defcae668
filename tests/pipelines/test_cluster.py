"""`ray job submit` to a local head started as on a real cluster (conftest's ``ray_head``: token auth,
the venv first on PATH, one GPU declared that CUDA cannot reach): evaluate's GPU actors must be
scheduled on it and run on CUDA or fall back to the CPU. extract_faces and score_videos go through
the same head in tests/test_docs.py (README's and docs/cluster.md's `ray job submit` lines)."""

import os
import sys

import pytest

from tests.ray_helpers import ROOT, submit_job


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
