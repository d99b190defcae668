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
