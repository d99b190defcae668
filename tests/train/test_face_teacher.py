import json

import pytest
import torch

from aver.models import Teacher, load_checkpoint
from aver.train.face import TeacherTrainConfig, run
from aver.train.harness import load_history
from tests.media_fixtures import corpus_subset

pytestmark = pytest.mark.timeout(600)


def _cfg(corpus, out, **kw):
    # half the corpus's rows: each of the two workers still takes 3 steps of 8 an epoch
    data = corpus_subset(corpus, out / "data", affectnet_rows=48, fec_triplets=30)
    return TeacherTrainConfig(output=str(out), name=kw.pop("name", "teacher128"), epochs=kw.pop("epochs", 2),
                              batch_size=8, cpus_per_worker=0.5, freeze="trunk", **data, **kw)


def test_two_workers_survive_a_mid_epoch_failure_and_resume(small_corpus, tmp_path, ray_local, capsys):
    cfg = _cfg(small_corpus, tmp_path, num_workers=2, fail_at=(1, 1), max_failures=1)
    history = run(cfg)
    assert [h["epoch"] for h in history] == [0, 1]
    marker = tmp_path / "runs" / "teacher128" / "injected_failure"
    assert marker.exists()  # the failure did happen (epoch 1, step 1)
    # Guards against: a restart that drops Ray's checkpoint and trains from epoch 0 again. The kept
    # checkpoint of epoch 0 predates the failure: epoch 0 was trained once, epoch 1 resumed from it.
    saved = {torch.load(p, weights_only=True)["epoch"]: p.stat().st_mtime
             for p in (tmp_path / "runs" / "teacher128").glob("checkpoint_*/state.pt")}
    assert sorted(saved) == [0, 1] and saved[0] < marker.stat().st_mtime < saved[1]
    model, meta = load_checkpoint(cfg.model_uri)
    assert isinstance(model, Teacher) and model.config.d_face == 128
    assert json.loads(meta["history"]) == history == load_history(cfg)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 140, 140))
    assert out.fec.shape == (2, 32) and torch.isfinite(out.affectnet).all()
    # A finished run is not trained again, and says so.
    capsys.readouterr()
    assert run(cfg) is None and "teacher128.pt exists; nothing to do" in capsys.readouterr().out
