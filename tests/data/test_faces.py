import shutil

import pytest

from aver.data.faces import affectnet_dataset, fec_dataset


def test_fec_without_fetched_images_says_what_to_run(small_corpus, tmp_path):
    csv = tmp_path / "fec" / "faceexp-comparison-data-test-public.csv"
    csv.parent.mkdir()
    shutil.copy(small_corpus / "fec" / csv.name, csv)
    with pytest.raises(ValueError) as e:
        fec_dataset(str(csv))
    assert "0 of " in str(e.value) and "run jobs/fetch_fec.py" in str(e.value)
    assert str(tmp_path / "fec" / "images") in str(e.value)


def test_rows_without_images_are_counted_and_left_out(small_corpus, tmp_path, capsys, ray_local):
    images = tmp_path / "images"
    shutil.copytree(small_corpus / "affectnet" / "Manually_Annotated_Images", images)
    lines = (small_corpus / "affectnet" / "validation.csv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    missing = rows[0].split(",")[0]
    (images / missing).unlink()
    csv = tmp_path / "validation.csv"
    csv.write_text("\n".join([header, *rows, rows[1].rsplit(",", 3)[0] + ",9,0,0"]) + "\n")
    ds, rejected = affectnet_dataset(str(csv), str(images))
    out = capsys.readouterr().out
    assert f"{len(rows) - 1} of {len(rows) + 1} rows used; 1 rejected" in out and "1 without their images" in out
    assert len(rejected) == 1
    ids = set(ds.to_pandas()["crop_id"])
    assert len(ids) == len(rows) - 1 and f"affectnet:{missing}" not in ids


def test_targets_join_the_rows_of_each_image(small_corpus, tmp_path, ray_local):
    # Guards against: a target joined to the wrong image (FEC's i/j/k, rows dropped by the reader).
    import numpy as np

    from aver.data.faces import distill_targets, unlabeled_dataset
    from aver.data.manifests import read_affectnet, read_fec
    from tests.media_fixtures import corpus_subset
    from tests.train.test_face_student import _few_targets

    data = corpus_subset(small_corpus, tmp_path / "data", affectnet_rows=12, fec_triplets=6)
    aff = read_affectnet(data["affectnet"], data["affectnet_images"]).records
    fec = read_fec(data["fec"]).records
    ids = sorted({r["crop_id"] for r in aff[::2]} | {f["crop_id"] for r in fec for f in r["faces"][:2]})
    ids += [f"unlabeled-{i}" for i in range(3)]
    m = np.random.default_rng(1).standard_normal((len(ids), 80)).astype(np.float32)
    _few_targets(tmp_path / "d", ids, m)
    want = dict(zip(ids, m))
    assert distill_targets(str(tmp_path / "d"), set(ids)).keys() == want.keys()

    def check(rows, id_key, suffix=""):
        for r in rows:
            t = want.get(r[id_key])
            assert r["has_target" + suffix] == (t is not None)
            assert np.array_equal(r["target" + suffix], t if t is not None else np.zeros(80, np.float32))
        return len(rows)

    rows = affectnet_dataset(data["affectnet"], data["affectnet_images"], targets=str(tmp_path / "d"))[0].take_all()
    assert check(rows, "crop_id") == 12 and sum(r["has_target"] for r in rows) == 6
    rows = fec_dataset(data["fec"], targets=str(tmp_path / "d"))[0].take_all()
    assert all(check(rows, f"{x}_id", f"_{x}") == 6 for x in "ijk")
    assert unlabeled_dataset(str(small_corpus / "unlabeled"), targets=str(tmp_path / "d")).count() == 24


class _Counter:
    """Stands in for the run's DroppedImages actor in one process."""

    def __init__(self):
        from aver.data.faces import DroppedImages

        self.actor = DroppedImages()
        self.add = self  # counter.add.remote(...)

    def remote(self, *args):
        self.actor.add(*args)


def test_reads_in_flight_retried_and_failures_counted(monkeypatch):
    # Guards against: reads one at a time (each S3 GET waited for in turn), transient faults that
    # drop an image instead of retrying it, and unreadable images dropped without being counted.
    import threading
    import time

    import numpy as np

    import aver.data.faces as faces
    from aver.faults import MediaError, RetryPolicy

    lock = threading.Lock()
    state = {"now": 0, "most": 0, "flaky": 0}

    def slow_load(source, storage_options=None):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.1)  # a GET's latency
        with lock:
            state["now"] -= 1
        if source.endswith("broken.jpg"):
            raise MediaError("corrupt", "not an image")
        if source.endswith("flaky.jpg") and state["flaky"] == 0:
            state["flaky"] += 1
            raise ConnectionResetError("connection reset")  # transient: tried again
        return np.full((200, 180, 3), 120, np.uint8)

    monkeypatch.setattr(faces, "load_image", slow_load)
    counter = _Counter()
    reading = faces.Reading(io_threads=8, retry=RetryPolicy(attempts=3, backoff_s=0.01), dropped=counter)
    wanted = [{"source": f"s3://b/{i}.jpg"} for i in range(14)] + [{"source": "s3://b/broken.jpg"},
                                                                    {"source": "s3://b/flaky.jpg"}]
    t = time.monotonic()
    crops = faces.read_crops(wanted, "unlabeled", reading)
    took = time.monotonic() - t
    assert state["most"] == 8 and took < 0.6  # 16 reads of 0.1 s, 8 at a time: ~0.3 s (one at a time: 1.6)
    assert [c is None for c in crops] == [False] * 14 + [True, False]
    assert all(c.shape == (140, 140, 3) and c.dtype == np.uint8 for c in crops if c is not None)
    assert counter.actor.counts() == {"unlabeled": 1}
    faces.read_crops(wanted[-2:-1], "unlabeled", reading)  # the same broken image read again: still one
    assert counter.actor.counts() == {"unlabeled": 1}


def _packed(folder, name, n, bad=(), no_face=(), skipped_by_distill=(), targets=None, row_group=4):
    """A faces part of ``n`` crops (``no_face`` rows without one, ``bad`` rows undecodable) and, with
    ``targets`` (a distill output folder), distill's part of the same name: its targets in the part's
    order, without ``skipped_by_distill`` and the faceless rows. Returns {crop_id: (pixels, target)}."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from aver.pipelines.distill import TARGETS_SCHEMA
    from aver.pipelines.extract import FACES_SCHEMA

    rng = np.random.default_rng(len(name) + n)
    rows, want, ids, values = [], {}, [], []
    for i in range(n):
        crop_id = f"{name}-{i:07d}"
        pixels = rng.integers(0, 255, (140, 140, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")  # lossless: the decoded crop is these pixels
        crop = None if i in no_face else b"\xff\xd8 broken" if i in bad else buf.getvalue()
        rows.append({"video_id": name, "source": "x", "crop_id": crop_id, "frame_index": i, "timestamp_s": i / 5.0,
                     "track_id": 0, "box": [0.0, 0.0, 1.0, 1.0], "prob": 0.99, "crop": crop})
        target = rng.standard_normal(80).astype(np.float32)
        if crop is not None and i not in skipped_by_distill:
            ids.append(crop_id)
            values.append(target)
        if crop is not None and i not in bad:
            want[crop_id] = (pixels, target if i not in skipped_by_distill else None)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FACES_SCHEMA), folder / "faces" / f"{name}.parquet",
                   row_group_size=row_group)
    if targets is not None:
        (targets / "targets").mkdir(parents=True, exist_ok=True)
        m = np.stack(values) if values else np.zeros((0, 80), np.float32)
        pq.write_table(pa.table({"crop_id": ids, "target": pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), 80)},
                                schema=TARGETS_SCHEMA), targets / "targets" / f"{name}.parquet", row_group_size=3)
    return want


def test_packed_crops_join_distills_targets_part_by_part(tmp_path, monkeypatch):
    # Guards against: a target joined to the wrong crop when the part and its targets are streamed
    # side by side (faceless rows, crops distill skipped, crops this reader cannot decode, slices
    # that end mid row group), and undecodable crops dropped without a count.
    import numpy as np

    import aver.data.faces as faces

    monkeypatch.setattr(faces, "PACKED_ROWS", 5)
    want = _packed(tmp_path / "x", "v1", 23, bad={6}, no_face={0, 9, 10}, skipped_by_distill={3, 17},
                   targets=tmp_path / "d")
    counter = _Counter()
    reading = faces.Reading(dropped=counter)
    part, targets = str(tmp_path / "x" / "faces" / "v1.parquet"), str(tmp_path / "d" / "targets" / "v1.parquet")
    batches = list(faces._part_crops(part, targets, reading))
    assert all(len(b["crop_id"]) <= 5 for b in batches)
    got = {c: (b["image"][i], b["target"][i], b["has_target"][i]) for b in batches for i, c in enumerate(b["crop_id"])}
    assert list(got) == list(want)  # every decodable crop with a face, once, in the part's order
    for crop_id, (pixels, target) in want.items():
        image, joined, has = got[crop_id]
        assert np.array_equal(image, pixels)
        assert has == (target is not None) and np.array_equal(joined, target if has else np.zeros(80, np.float32))
    assert counter.actor.counts() == {"unlabeled": 1}
    assert len(list(faces._part_crops(part, None, reading))[0]) == 2  # no targets: crop ids and images only
    (tmp_path / "x" / "faces" / "cut.parquet").write_bytes(b"PAR1 cut short")  # one unreadable part: counted once
    batch = {"name": ["cut", "v1"], "part": [str(tmp_path / "x" / "faces" / "cut.parquet"), part], "targets": ["", ""]}
    assert sum(len(b["crop_id"]) for b in faces._packed_batches(batch, reading)) == len(want)  # the next part read
    assert counter.actor.counts() == {"unlabeled": 2}


def test_unlabeled_faces_parts_without_targets_are_left_out(tmp_path, capsys, ray_local):
    import numpy as np

    from aver.data.faces import unlabeled_dataset

    a = _packed(tmp_path / "x", "a", 7, no_face={2}, targets=tmp_path / "d")
    _packed(tmp_path / "x", "b", 5)  # not distilled yet
    rows = unlabeled_dataset(str(tmp_path / "x"), targets=str(tmp_path / "d")).take_all()
    assert "1 faces parts, read packed; 1 without targets left out" in capsys.readouterr().out
    assert sorted(r["crop_id"] for r in rows) == sorted(a)
    assert all(r["has_target"] and np.array_equal(r["target"], a[r["crop_id"]][1]) for r in rows)
    assert unlabeled_dataset(str(tmp_path / "x" / "faces")).count() == 6 + 5  # no targets asked: every crop
    with pytest.raises(FileNotFoundError, match="run jobs/distill.py"):
        unlabeled_dataset(str(tmp_path / "x"), targets=str(tmp_path / "nothing"))
