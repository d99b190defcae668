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
