import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from aver.data.faces import affectnet_dataset
from aver.data.prefix_store import PrefixStore, prefix_store_folder
from aver.pipelines.evaluate import EvaluateConfig, face_metrics, run
from aver.models import FusionModel, Student, VGGishEmotion, save_checkpoint

pytestmark = pytest.mark.timeout(900)


def test_evaluate_writes_the_paper_metrics_against_known_answers(small_corpus, tmp_path, ray_local):
    # Guards against: evaluate scoring the wrong FEC pair, swapping arousal and valence, recomputing
    # what a training run cached, or redoing finished splits. FEC: every test triplet is rewritten so
    # that its annotated pair is one picture twice, so the right pair is always the closest (accuracy
    # exactly 1) and any other never is (0). RECOLA: CCC per column of a direct forward of the fusion
    # model over the same windows. (The GPU shares of its actor pools are checked on a head that
    # declares a GPU by tests/test_docs.py, whose docs/cluster.md submits evaluate.)
    import csv

    from aver.data.manifests import read_recola
    from aver.data.recola import SessionFeaturizer, SessionWindows
    from aver.metrics import ccc
    from aver.models import load_checkpoint

    torch.manual_seed(0)
    models = tmp_path / "models"
    student = Student()
    save_checkpoint(student, str(models / "student.pt"))
    nodistill = copy.deepcopy(student)  # the ablation: same frozen prefix, other denseblock4
    with torch.no_grad():
        nodistill.backbone.features.denseblock4.denselayer1.conv1.weight.mul_(-1)
    save_checkpoint(nodistill, str(models / "student_nodistill.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_arousal.pt"))
    save_checkpoint(VGGishEmotion(), str(models / "vggish_valence.pt"))
    fusion = FusionModel(1920, 256)
    with torch.no_grad():
        fusion.head.weight.mul_(30)  # outputs that vary, so the two columns' CCCs differ clearly
    save_checkpoint(fusion, str(models / "fusion.pt"))
    save_checkpoint(FusionModel(1920, 256, modalities=("audio",)), str(models / "fusion_audio.pt"))
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
    cfg = EvaluateConfig(models=str(models), data=str(data), output=str(tmp_path / "eval"), window_s=4.8,
                         prefix_cache=str(tmp_path / "train"))
    stage = student.shared_stage(nodistill)
    folder = prefix_store_folder(str(tmp_path / "train"), student, stage, Student.preprocess)
    train_images = affectnet_dataset(str(small_corpus / "affectnet" / "training.csv"),
                                     str(small_corpus / "affectnet" / "Manually_Annotated_Images"))[0].take_all()
    cached = np.stack([r["image"] for r in train_images])
    marked = torch.full((len(cached), *student.prefix(stage)(Student.preprocess(cached[:1])).shape[1:]), 0.5)
    training = PrefixStore(folder, "student-rank0")
    training.encode(cached, lambda x: marked[: len(x)])  # outputs a real prefix never gives
    training.save()
    metrics = run(cfg)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == metrics
    assert sorted(p.name for p in (tmp_path / "train" / "cache" / os.path.basename(folder)).iterdir()) == \
        ["student-rank0-0.keys.npy", "student-rank0-0.npy"]  # read, never added to
    # Each split's embeddings were saved as it finished: a rerun reads them, even without the images.
    done = sorted(p.name for p in (tmp_path / "eval" / "embeddings").glob("*/*.npz"))
    assert done == ["affectnet_eval.npz", "affectnet_train.npz", "fec_eval.npz"]
    students = {"student": str(models / "student.pt"), "student_nodistill": str(models / "student_nodistill.pt")}
    assert metrics["fec_triplet_accuracy"] == metrics["student_nodistill.fec_triplet_accuracy"] == 1.0
    # the dev windows evaluate scored, cut again here from the session timelines it cached
    (features,) = (tmp_path / "eval" / "features").iterdir()
    c = SessionWindows(recola=str(data / "recola"), student=str(models / "student.pt"),
                       vggish_arousal=str(models / "vggish_arousal.pt"), vggish_valence=str(models / "vggish_valence.pt"),
                       window_s=4.8, features_cache=str(features))
    dev = [r for r in read_recola(c.recola).records if r["split"] == "dev"]
    windows = SessionFeaturizer(c)({k: [r[k] for r in dev] for k in dev[0]})
    with torch.no_grad():
        pred = load_checkpoint(str(models / "fusion.pt"))[0](torch.from_numpy(windows["visual"]),
                                                            torch.from_numpy(windows["audio"])).numpy()
    target = windows["target"]
    for dim, col in (("arousal", 0), ("valence", 1)):
        right = ccc(target[:, col], pred[:, col])
        wrong = [ccc(target[:, col], pred[:, 1 - col]), ccc(target[:, 1 - col], pred[:, 1 - col])]
        assert all(abs(w - right) > 0.05 * abs(right) for w in wrong)  # so a swap would show
        assert metrics["ccc"][dim]["fused"] == pytest.approx(right, rel=1e-3)
    (data / "affectnet").unlink()
    shutil.rmtree(data / "fec")
    again = face_metrics(cfg, students)
    assert again["student"] == {k: metrics[k] for k in ("affectnet_accuracy", "fec_triplet_accuracy")}
    # The AffectNet training embeddings came from the marked prefix outputs, the others were computed.
    with np.load(next((tmp_path / "eval" / "embeddings").glob("*/affectnet_train.npz"))) as z:
        from_cache = z["student.image"]
    with torch.no_grad():
        expected = student.eval()(marked[:1], after=stage).embedding.numpy()
    assert np.allclose(from_cache, expected, atol=1e-3)
    for prefix in ("", "student_nodistill."):
        assert 0 <= saved[f"{prefix}affectnet_accuracy"] <= 1 and 0 <= saved[f"{prefix}fec_triplet_accuracy"] <= 1
    assert set(saved["ccc"]) == {"arousal", "valence"}
    assert set(saved["ccc"]["arousal"]) == {"fused", "audio"}  # no visual-only model given
    assert all(-1 <= v <= 1 for d in saved["ccc"].values() for v in d.values())
    table = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| affectnet_accuracy |" in table and "0.616" in table and "| ccc.valence.fused |" in table
    assert f"| metric | this run ({data}) | paper (AffectNet / FEC / RECOLA) |" in table and "not comparable" in table


def test_students_sharing_a_prefix_are_embedded_as_if_alone(tmp_path):
    from aver.pipelines.evaluate import _FaceEmbedder

    torch.manual_seed(0)
    a = Student().eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.backbone.features.norm5.weight.mul_(2)
        b.fec_head.weight.mul_(-1)
    assert a.shared_stage(b) == "denseblock4"
    uris = {name: str(tmp_path / f"{name}.pt") for name in "ab"}
    save_checkpoint(a, uris["a"])
    save_checkpoint(b, uris["b"])
    embed = _FaceEmbedder(EvaluateConfig(models="m", data="d", output="o"), uris, ("i", "j"), "fec")
    assert embed.stage == "denseblock4"
    images = np.random.default_rng(0).integers(0, 256, (3, 140, 140, 3), dtype=np.uint8)
    out = embed({"i": images[:2], "j": images[1:], "label": np.array([0, 1])})
    with torch.no_grad():
        for name, model in (("a", a), ("b", b)):
            assert np.allclose(out[f"{name}.j"], model(Student.preprocess(images[1:])).fec.numpy(), atol=1e-5)
    assert not np.allclose(out["a.i"], out["b.i"])
    assert out["label"].tolist() == [0, 1]
