import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from aver.pipelines.distill import DistillConfig, run, teacher_targets
from aver.pipelines.extract import FACES_SCHEMA
from aver.models import Teacher, save_checkpoint
from aver.io.parts import read_folder, write_table
from tests.media_fixtures import face_patch

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    t1, t2 = Teacher(d_face=128).eval(), Teacher(d_face=256).eval()
    save_checkpoint(t1, str(d / "t128.pt"))
    save_checkpoint(t2, str(d / "t256.pt"))
    return (t1, t2), (str(d / "t128.pt"), str(d / "t256.pt"))


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _faces_part(path, video_id, n, with_face):
    rng = np.random.default_rng(len(video_id))
    patch = np.asarray(Image.fromarray(face_patch(140)).resize((140, 140)))
    rows = []
    for i in range(n):
        crop = _jpeg(np.clip(patch.astype(int) + rng.integers(-20, 20, patch.shape), 0, 255).astype(np.uint8))
        rows.append({"video_id": video_id, "source": "x", "crop_id": f"{video_id}-{i:07d}", "frame_index": i,
                     "timestamp_s": i / 5, "track_id": 0 if with_face(i) else None,
                     "box": [0.0, 0.0, 1.0, 1.0] if with_face(i) else None, "prob": 0.99 if with_face(i) else None,
                     "crop": crop if with_face(i) else None})
    write_table(str(path), pa.Table.from_pylist(rows, schema=FACES_SCHEMA))
    return [r["crop_id"] for r in rows if r["crop"] is not None], [r["crop"] for r in rows if r["crop"] is not None]


def test_targets_are_normalised_parts():
    class O:
        def __init__(self, b):
            self.fec, self.affectnet = torch.randn(b, 32) * 5, torch.randn(b, 8) * 3

    t = teacher_targets(O(4), O(4))
    assert t.shape == (4, 80)
    for lo, hi in ((0, 32), (32, 40), (40, 72), (72, 80)):
        assert torch.allclose(t[:, lo:hi].norm(dim=1), torch.ones(4), atol=1e-5)


def test_distill_matches_direct_teacher_forward(tmp_path, teachers, ray_local):
    (t1, t2), uris = teachers
    faces = tmp_path / "run" / "faces"
    ids_a, crops_a = _faces_part(faces / "a.parquet", "a", 12, lambda i: i % 3 != 0)
    ids_b, crops_b = _faces_part(faces / "b.parquet", "b", 5, lambda i: True)
    write_table(str(faces / "empty.parquet"), pa.Table.from_pylist([], schema=FACES_SCHEMA))
    (faces / "broken.parquet").write_bytes(b"not parquet")
    cfg = DistillConfig(input=str(tmp_path / "run"), teachers=uris, output=str(tmp_path / "out"),
                        batch_size=4, actors=1, cpus_per_actor=0.5)
    assert run(cfg) == {"ok": 3, "corrupt": 1}  # one status row per faces part
    targets = read_folder(str(tmp_path / "out" / "targets")).to_pandas().set_index("crop_id")
    assert sorted(targets.index) == sorted(ids_a + ids_b)
    # Independent path: decode, standardise, both teachers in fp32, normalise, concatenate.
    images = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in crops_a]
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - 127.5) / 128
    with torch.no_grad():
        o1, o2 = t1(x), t2(x)
    expected = torch.cat([torch.nn.functional.normalize(v, dim=1) for v in (o1.fec, o1.affectnet, o2.fec, o2.affectnet)], 1)
    got = np.stack(targets.loc[ids_a, "target"].to_numpy())
    assert got.dtype == np.float32 and got.shape == (len(ids_a), 80)
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas().set_index("item_id")
    assert status.loc["broken", "status"] == "corrupt" and "broken" in status.loc["broken", "source"]
    assert status.loc["a", "status"] == "ok" and status.loc["a", "n_frames"] == len(ids_a)
    assert status.loc["empty", "n_frames"] == 0
    assert run(cfg) == {}  # rerun: all units complete


def test_distill_image_folder_with_bad_images(tmp_path, teachers, ray_local):
    _, uris = teachers
    folder = tmp_path / "imgs"
    folder.mkdir()
    patch = face_patch(140)
    for i in range(3):
        Image.fromarray(patch).save(folder / f"f{i}.jpg")
    Image.fromarray(patch).convert("L").save(folder / "gray.png")
    (folder / "bad.jpg").write_bytes(b"\x00" * 10)
    cfg = DistillConfig(input=str(folder), teachers=uris, output=str(tmp_path / "out"), batch_size=2,
                        actors=1, cpus_per_actor=0.5, images_per_unit=3)
    assert run(cfg) == {"ok": 4, "corrupt": 1}
    assert read_folder(str(tmp_path / "out" / "targets")).num_rows == 4
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas()
    assert len(status) == 5
    assert dict(zip(status["source"].str.rsplit("/", n=1).str[-1], status["status"]))["bad.jpg"] == "corrupt"


def test_preprocess_resizes_and_standardises():
    img = np.full((70, 90, 3), 255, np.uint8)
    x = Teacher.preprocess([img, np.zeros((140, 140, 3), np.uint8)], torch.device("cpu"))
    assert x.shape == (2, 3, 140, 140)
    assert torch.allclose(x[0], torch.full_like(x[0], 127.5 / 128)) and torch.allclose(x[1], torch.full_like(x[1], -127.5 / 128))


def test_config_validation():
    with pytest.raises(ValueError):
        DistillConfig(input="x", teachers=("a",), output="o")
    with pytest.raises(ValueError):
        DistillConfig(input="x", teachers=("a", "b"), output="o", precision="fp8")
    with pytest.raises(ValueError, match="images of one input"):
        DistillConfig(input=("x.csv", "y.csv"), images_root="imgs", teachers=("a", "b"), output="o")
    assert DistillConfig(input="s3://k:s@b/x", teachers=("a", "b"), output="o").input == ("s3://b/x",)


def _expected_targets(teachers, crops):
    t1, t2 = teachers
    x = (torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() - 127.5) / 128
    with torch.no_grad():
        o1, o2 = t1(x), t2(x)
    return torch.cat([torch.nn.functional.normalize(v, dim=1)
                      for v in (o1.fec, o1.affectnet, o2.fec, o2.affectnet)], 1).numpy()


def test_distill_both_manifests_in_one_run_crops_given_boxes_and_dedupes(tmp_path, teachers, ray_local):
    # Guards against: manifest boxes ignored, FEC crops shared by triplets distilled twice, and
    # several inputs planned as one (each reads its own images; a rerun finds every unit complete).
    from aver.data.manifests import fec_image_name
    from aver.faces import crop_face
    from aver.pipelines.distill import plan_units

    models, uris = teachers
    affectnet = tmp_path / "affectnet"
    (affectnet / "Manually_Annotated_Images" / "1").mkdir(parents=True)  # the release's layout: no --images-root
    scene = np.full((300, 400, 3), 80, np.uint8)
    patch = face_patch(160)
    scene[60:220, 100:100 + patch.shape[1]] = patch
    Image.fromarray(scene).save(affectnet / "Manually_Annotated_Images" / "1" / "a.png")
    (affectnet / "training.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
        "1/a.png,100,60,130,160,,1,0.5,0.2\n1/missing.png,0,0,10,10,,2,0,0\n1/a.png,0,0,5,5,,9,0,0\n")
    (tmp_path / "fec" / "images").mkdir(parents=True)
    for url in ("http://x/1.jpg", "http://x/2.jpg"):
        Image.fromarray(face_patch(140)).save(tmp_path / "fec" / "images" / fec_image_name(url), format="JPEG")
    row = ("http://x/1.jpg,0.1,0.9,0.1,0.9,http://x/2.jpg,0.0,1.0,0.0,1.0,http://x/3.jpg,0.1,0.9,0.1,0.9,"
           "TWO_CLASS_TRIPLET,a,3,b,3\n")
    (tmp_path / "fec" / "fec.csv").write_text(row + row)
    cfg = DistillConfig(input=(str(affectnet / "training.csv"), str(tmp_path / "fec" / "fec.csv")), teachers=uris,
                        output=str(tmp_path / "out"), actors=1, cpus_per_actor=0.5)
    # AffectNet: one crop, one missing image (the label-9 row is rejected by the reader, not a crop);
    # FEC: three unique crops, image 3 never fetched.
    assert run(cfg) == {"ok": 3, "corrupt": 2}
    targets = read_folder(str(tmp_path / "out" / "targets")).to_pandas().set_index("crop_id")
    assert len(targets) == 3 and targets.index.is_unique
    expected = _expected_targets(models, [crop_face(scene, (100, 60, 230, 220), size=140, margin=0.2)])
    assert np.allclose(targets.loc["affectnet:1/a.png", "target"], expected[0], atol=1e-4)
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas().set_index("item_id")
    assert len(status) == 5 and status.loc["affectnet:1/missing.png", "status"] == "corrupt"
    again = plan_units(cfg)
    assert (again.units, again.n_complete) == ([], 2)  # one chunk per dataset, each counted once


def test_shared_trunk_path_equals_two_separate_forwards(tmp_path):
    # Guards against: the path real teachers take (one FaceNet trunk shared by both, run once)
    # differing from running each teacher whole: wrong teacher order, heads fed the wrong tensor.
    from aver.pipelines.distill import TeacherPair

    torch.manual_seed(0)
    t1, t2 = Teacher(d_face=128).eval(), Teacher(d_face=256).eval()
    t2.trunk.load_state_dict(t1.trunk.state_dict())
    save_checkpoint(t1, str(tmp_path / "t1.pt"))
    save_checkpoint(t2, str(tmp_path / "t2.pt"))
    pair = TeacherPair(DistillConfig(input="x", teachers=(str(tmp_path / "t1.pt"), str(tmp_path / "t2.pt")),
                                     output=str(tmp_path / "out")))
    assert pair.shared_trunk
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (140, 140, 3), dtype=np.uint8) for _ in range(3)]
    got = pair.targets(images)
    assert np.allclose(got, _expected_targets((t1, t2), images), atol=1e-5)
    swapped = _expected_targets((t2, t1), images)
    assert not np.allclose(got[:, :32], swapped[:, :32], atol=1e-3)  # the teachers' order matters


def test_preprocess_keeps_rgb_order():
    # Guards against: BGR/RGB swaps (a grey image cannot tell): a red crop stays red in channel 0.
    red = np.zeros((140, 140, 3), np.uint8)
    red[..., 0] = 255
    x = Teacher.preprocess([red], torch.device("cpu"))
    assert torch.allclose(x[0, 0], torch.full((140, 140), 127.5 / 128))
    assert torch.allclose(x[0, 2], torch.full((140, 140), -127.5 / 128))


def test_a_faces_part_of_10000_crops_is_loaded_a_slice_at_a_time(tmp_path):
    # Guards against: a whole faces part made one record (an hour of video: ~18k crops, ~1 GB in one
    # pickled cell) and a load task that holds it. The part is written as parts were before row
    # groups (one row group): slicing by rows must hold there too.
    import tracemalloc

    import pyarrow.parquet as pq

    from aver.pipelines.distill import load_unit
    from aver.pipelines.ledger import Unit

    n, per_slice = 10_000, 256
    crop = _jpeg(np.asarray(Image.fromarray(face_patch(140)).resize((140, 140))))
    ids = [f"v-{i:07d}" for i in range(n)]
    table = pa.table({"video_id": ["v"] * n, "source": ["x"] * n, "crop_id": ids, "frame_index": list(range(n)),
                      "timestamp_s": [i / 5 for i in range(n)], "track_id": [0] * n, "box": [None] * n,
                      "prob": [0.99] * n, "crop": [crop] * n}).cast(FACES_SCHEMA)
    part = tmp_path / "faces" / "v.parquet"
    part.parent.mkdir()
    pq.write_table(table, part, row_group_size=n)
    del table
    assert pq.ParquetFile(part).metadata.num_row_groups == 1
    cfg = DistillConfig(input=str(tmp_path), teachers=("a.pt", "b.pt"), output=str(tmp_path / "out"),
                        images_per_unit=per_slice)
    unit = Unit("v", [{"item_id": "v", "source": str(part), "kind": "faces"}])
    slice_bytes = per_slice * 140 * 140 * 3
    seen, most = [], 0
    tracemalloc.start()
    try:
        for record in load_unit(unit, cfg):
            assert len(record.ids) <= per_slice and record.images.shape[0] == len(record.ids)
            seen += record.ids
            most = max(most, pa.total_allocated_bytes())
            del record
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == ids  # every crop once, in order
    # the part's crops decoded at once would be 10,000 x 58.8 KB = 588 MB
    assert peak < 4 * slice_bytes, (peak, slice_bytes)
    assert most < 16 * 2**20, most  # Arrow's own buffers: pages of the part, not the part
