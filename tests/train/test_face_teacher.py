import json

import pytest
import torch

from aver.models import Teacher, load_checkpoint
from aver.train.face import TeacherTrainConfig, run
from aver.train.harness import load_history
from tests.media_fixtures import corpus_subset

pytestmark = pytest.mark.timeout(600)


def _cfg(corpus, out, broken=False, **kw):
    # half the corpus's rows: each of the two workers still takes 3 steps of 8 an epoch
    data = corpus_subset(corpus, out / "data", affectnet_rows=48, fec_triplets=30)
    if broken:
        data = _with_a_broken_image(data, out / "data")
    return TeacherTrainConfig(output=str(out), epochs=kw.pop("epochs", 2),
                              batch_size=8, cpus_per_worker=0.5, freeze="trunk", **data, **kw)


def _with_a_broken_image(data, dst):
    """The AffectNet rows with their images copied, and one more row whose image is not an image."""
    import shutil

    images = dst / "affectnet_images"
    lines = open(data["affectnet"]).read().splitlines()
    for line in lines[1:]:
        rel = line.split(",")[0]
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{data['affectnet_images']}/{rel}", images / rel)
    (images / "broken").mkdir()
    (images / "broken" / "face.jpg").write_bytes(b"not a jpeg")
    lines.append(",".join(["broken/face.jpg", *lines[1].split(",")[1:]]))
    open(data["affectnet"], "w").write("\n".join(lines) + "\n")
    return {**data, "affectnet_images": str(images)}


def test_two_workers_survive_a_mid_epoch_failure_and_resume(small_corpus, tmp_path, ray_local, capsys):
    # both teachers side by side (the paper's two), as docs/cluster.md trains them
    # gradients all-reduced in bf16 (forced on: "auto" sends fp32 on CPUs); one AffectNet image broken
    cfg = _cfg(small_corpus, tmp_path, num_workers=2, fail_at=(1, 1), max_failures=1, d_face=(128, 256),
               grad_comm="bf16", broken=True)
    histories = run(cfg)
    assert sorted(histories) == ["teacher128", "teacher256"]
    history = histories["teacher128"]
    assert [h["epoch"] for h in history] == [0, 1] and [h["epoch"] for h in histories["teacher256"]] == [0, 1]
    # Guards against: unreadable images dropped silently. Counted once however often they are read.
    assert [(h["dropped_affectnet"], h["dropped_fec"]) for h in history] == [(1, 0), (1, 0)]
    run_dir = tmp_path / "runs" / "teacher128+teacher256"
    marker = run_dir / "injected_failure"
    assert marker.exists()  # the failure did happen (epoch 1, step 1)
    # Guards against: a restart that drops Ray's checkpoint and trains from epoch 0 again. The kept
    # checkpoint of epoch 0 predates the failure: epoch 0 was trained once, epoch 1 resumed from it.
    saved = {torch.load(p, weights_only=True)["epoch"]: p.stat().st_mtime
             for p in run_dir.glob("checkpoint_*/state.pt")}
    assert sorted(saved) == [0, 1] and saved[0] < marker.stat().st_mtime < saved[1]
    for d in (128, 256):
        model, meta = load_checkpoint(cfg.model_uri(f"teacher{d}"))
        assert isinstance(model, Teacher) and model.config.d_face == d
        assert json.loads(meta["history"]) == histories[f"teacher{d}"] == load_history(cfg, f"teacher{d}")
        with torch.no_grad():
            out = model(torch.randn(2, 3, 140, 140))
        assert out.fec.shape == (2, 32) and out.embedding.shape == (2, d) and torch.isfinite(out.affectnet).all()
    # The run's TensorBoard curves hold epochs 0 and 1 once each, although epoch 1 ran twice.
    from tests.train.test_harness import _read_events

    steps = {}
    for event in _read_events(run_dir / "events.out.tfevents.aver")[1:]:
        for v in event.summary.value:
            steps.setdefault(v.tag, []).append(event.step)
    assert steps["teacher128/loss"] == steps["teacher256/accuracy"] == steps["lr"] == [0, 1]
    # A finished run is not trained again, and says so.
    capsys.readouterr()
    said = capsys.readouterr().out if run(cfg) is None else ""
    assert "teacher128.pt" in said and "teacher256.pt" in said and "nothing to do" in said
