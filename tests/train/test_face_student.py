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


def test_student_trains_on_unlabeled_faces_parts_on_s3_with_their_distilled_targets(small_corpus, tmp_path, s3,
                                                                                      ray_local):
    # The PowderFaces role as a cluster holds it: extract_faces' parts on S3, distill run on them
    # (targets/<part>.parquet), the student reading both part by part. A broken crop is counted.
    import glob

    import fsspec
    import pyarrow as pa

    from aver.io.parts import write_table
    from aver.pipelines.distill import DistillConfig
    from aver.pipelines.distill import run as distill
    from aver.pipelines.extract import FACES_SCHEMA
    from aver.models import Teacher, save_checkpoint

    so = s3["options"]
    root = f"s3://{s3['bucket']}/student-packed"
    crops = [open(p, "rb").read() for p in sorted(glob.glob(str(small_corpus / "unlabeled" / "*.jpg")))]
    for v in range(3):
        rows = [{"video_id": f"v{v}", "source": f"v{v}.mp4", "crop_id": f"v{v}-{i:07d}", "frame_index": i,
                 "timestamp_s": i / 5, "track_id": 0, "box": [0.0, 0.0, 1.0, 1.0], "prob": 0.99,
                 "crop": b"\xff\xd8 cut short" if (v, i) == (1, 3) else crops[(8 * v + i) % len(crops)]}
                for i in range(8)]
        write_table(f"{root}/faces/faces/v{v}.parquet", pa.Table.from_pylist(rows, schema=FACES_SCHEMA), so)
    torch.manual_seed(0)
    teachers = []
    for d in (128, 256):
        teachers.append(str(tmp_path / f"t{d}.pt"))
        save_checkpoint(Teacher(d_face=d).eval(), teachers[-1])
    distill(DistillConfig(input=f"{root}/faces", teachers=tuple(teachers), output=f"{root}/distill",
                          storage_options=so, batch_size=16, cpus_per_actor=1))
    fs = fsspec.filesystem("s3", **so)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/distill/targets")) == ["v0.parquet", "v1.parquet",
                                                                                       "v2.parquet"]
    data = corpus_subset(small_corpus, tmp_path / "data", affectnet_rows=16, fec_triplets=8)
    cfg = StudentTrainConfig(output=str(tmp_path / "out"), name="student", epochs=2, batch_size=4,
                             freeze="transition3", targets=f"{root}/distill", unlabeled=f"{root}/faces",
                             storage_options=so, **data)
    history = run(cfg)["student"]
    assert all(h["loss_rkd"] > 0 for h in history)  # only the unlabeled crops have targets: they reached the head
    assert [h["dropped_unlabeled"] for h in history] == [1, 1] and history[-1]["dropped_affectnet"] == 0
