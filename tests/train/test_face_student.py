import numpy as np
import pytest
import torch

from aver.models import Student, load_checkpoint
from aver.train.face import StudentTrainConfig, run
from tests.media_fixtures import corpus_subset

pytestmark = pytest.mark.timeout(900)


def test_targets_are_read_for_the_wanted_crops_only_and_joined_to_their_rows(tmp_path):
    # The driver joins each row its target (zeros and has_target False where distill gave none);
    # workers never read a whole targets table.
    from aver.data.faces import _target, distill_targets

    m = np.arange(240, dtype=np.float32).reshape(3, 80)
    _few_targets(tmp_path, ["a", "b", "c"], m)
    found = distill_targets(str(tmp_path), {"b", "zz", "a"})
    assert sorted(found) == ["a", "b"]  # "c" is not wanted, "zz" has none
    assert np.array_equal(found["b"], m[1]) and np.array_equal(found["a"], m[0])
    row = _target(found, "zz")
    assert not row["has_target"] and not row["target"].any() and row["target"].shape == (80,)


def test_config_needs_targets_for_unlabeled(tmp_path):
    with pytest.raises(ValueError, match="targets"):
        StudentTrainConfig(output=str(tmp_path), name="s", affectnet="a", fec="f", unlabeled="u")


def _few_targets(folder, crop_ids, m=None):
    """A distill output holding targets ``m`` (default random) for ``crop_ids`` only."""
    import pyarrow as pa

    from aver.io.parts import write_table
    from aver.pipelines.distill import TARGETS_SCHEMA

    if m is None:
        m = np.random.default_rng(0).standard_normal((len(crop_ids), 80)).astype(np.float32)
    write_table(str(folder / "targets" / "p.parquet"), pa.table(
        {"crop_id": list(crop_ids), "target": pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), 80)},
        schema=TARGETS_SCHEMA))
    return str(folder)


@pytest.mark.parametrize("targets", ["none", "two crops"])
def test_two_workers_train_without_targets_and_with_steps_that_have_too_few(small_corpus, tmp_path, ray_local,
                                                                            targets):
    # Guards against: DDP waiting for the distillation head's gradient when no loss reaches it (no
    # --targets, or a step with fewer than 3 crops that have a target): both ranks fail with
    # "Expected to have finished reduction in the prior iteration".
    from aver.data.manifests import read_affectnet

    data = corpus_subset(small_corpus, tmp_path / "data", affectnet_rows=16, fec_triplets=8)
    given = None
    if targets == "two crops":
        ids = [r["crop_id"] for r in read_affectnet(data["affectnet"], data["affectnet_images"]).records[:2]]
        given = _few_targets(tmp_path / "d", ids)
    cfg = StudentTrainConfig(output=str(tmp_path), name="student", epochs=1, batch_size=4, cpus_per_worker=0.5,
                             num_workers=2, freeze="transition3", targets=given, **data)
    history = run(cfg)["student"]
    assert history[0]["loss_fec"] > 0 and history[0]["loss_affectnet"] > 0
    if given:
        assert history[0]["loss_rkd"] == 0  # never 3 crops with a target in one step
    trained, _ = load_checkpoint(cfg.model_uri("student"))
    head = trained.distill_head.weight
    torch.manual_seed(cfg.seed)  # the untrained head keeps its initialisation when no target reaches it
    assert torch.equal(head, Student().distill_head.weight) == (given is None)

