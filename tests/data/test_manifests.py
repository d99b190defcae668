import pytest

from aver.data.manifests import (affectnet_csv, affectnet_images_root, fec_image_name, is_affectnet_csv, is_fec_csv,
                                 read_affectnet, read_fec)

AFFECTNET = """subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal
689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg,134,134,899,899,181.64;530.91;188.32,1,0.785714,-0.055556
392/c4db2f9b7e4b422d14b6e038f0cdc3ecee239b55326e9181ee4520f9.jpg,20,20,161,161,"x;y",0,-0.017253,0.004313
468/21772b68dc8c2a11678c8739eca33adb6ccc658600e4da2224d91a9d.jpg,11,11,112,112,,9,-2,-2
badrow,1,2
../escape.jpg,1,1,10,10,,2,0,0
100/x.jpg,1,1,0,10,,2,0,0
100/y.jpg,a,1,10,10,,2,0,0
100/z.jpg,1,1,10,10,,7,0.1,0.2
"""

FEC_ROW = ("http://a/1.jpg,0.1,0.9,0.2,0.8,http://a/2.jpg,0.0,1.0,0.0,1.0,http://a/3.jpg,0.2,0.7,0.1,0.9,"
           "ONE_CLASS_TRIPLET,{votes}")


def test_read_affectnet_keeps_0_to_7_and_reports_bad_rows(tmp_path):
    csv = tmp_path / "training.csv"
    csv.write_text(AFFECTNET)
    assert is_affectnet_csv(str(csv)) and not is_fec_csv(str(csv))
    m = read_affectnet(str(csv), images_root="/data/imgs")
    assert [r["label"] for r in m.records] == [1, 0, 7]
    first = m.records[0]
    assert first["source"] == "/data/imgs/689/737db2483489148d783ef278f43f486c0a97e140fc4b6b61b84363ca.jpg"
    assert first["box"] == (134.0, 134.0, 1033.0, 1033.0)
    assert first["valence"] == pytest.approx(0.785714) and first["crop_id"].startswith("affectnet:689/")
    reasons = [r["reason"] for r in m.rejected]
    assert len(reasons) == 5
    assert any("8-10" in r for r in reasons) and any("fields" in r for r in reasons)
    assert any("bad image path" in r for r in reasons) and any("empty face box" in r for r in reasons)



@pytest.mark.parametrize("layout", ["release", "demo"])
def test_affectnet_images_and_file_lists_found_in_either_layout(tmp_path, layout):
    # The release: Manually_Annotated_file_lists/training.csv beside Manually_Annotated_Images/;
    # the demo corpus: training.csv beside Manually_Annotated_Images/. No flag needed for either.
    lists = tmp_path / "AffectNet" / ("Manually_Annotated_file_lists" if layout == "release" else "")
    images = tmp_path / "AffectNet" / "Manually_Annotated_Images"
    (images / "689").mkdir(parents=True)
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "training.csv").write_text(AFFECTNET)
    assert affectnet_csv(str(tmp_path / "AffectNet"), "training") == str(lists / "training.csv")
    assert affectnet_images_root(str(lists / "training.csv")) == str(images)
    assert read_affectnet(str(lists / "training.csv")).records[0]["source"] == str(images / AFFECTNET.split()[1].split(",")[0])
    assert read_affectnet(str(lists / "training.csv"), "/elsewhere").records[0]["source"].startswith("/elsewhere/689/")


def test_affectnet_without_its_image_folder_says_where_it_looked(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "training.csv").write_text(AFFECTNET)
    with pytest.raises(ValueError, match="no Manually_Annotated_Images/ beside .* --affectnet-images"):
        read_affectnet(str(tmp_path / "lists" / "training.csv"))
    with pytest.raises(ValueError, match="no AffectNet validation.csv"):
        affectnet_csv(str(tmp_path), "validation")


def test_read_affectnet_rejects_other_csv(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an AffectNet CSV"):
        read_affectnet(str(tmp_path / "x.csv"))


def test_read_fec_majority_vote_types_and_bad_rows(tmp_path):
    rows = [
        FEC_ROW.format(votes="a1,3,a2,3,a3,1"),          # image 3 is the odd one: pair (0, 1)
        FEC_ROW.format(votes="a1,1,a2,1").replace("ONE_CLASS", "THREE_CLASS"),  # pair (1, 2)
        FEC_ROW.format(votes="a1,1,a2,2"),                # tie
        FEC_ROW.format(votes="a1,4"),                     # invalid answer
        FEC_ROW.format(votes="a1,1").replace("ONE_CLASS_TRIPLET", "FOUR"),
        "http://a/1.jpg,0.9,0.1,0.2,0.8,http://a/2.jpg,0,1,0,1,http://a/3.jpg,0,1,0,1,ONE_CLASS_TRIPLET,a,1",
        "too,short",
    ]
    csv = tmp_path / "faceexp-comparison-data-train-public.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert is_fec_csv(str(csv)) and not is_affectnet_csv(str(csv))
    m = read_fec(str(csv))
    assert [(r["pair"], r["odd"], r["type"]) for r in m.records] == [((0, 1), 2, 0), ((1, 2), 0, 2)]
    face = m.records[0]["faces"][0]
    assert face["box_frac"] == (0.1, 0.2, 0.9, 0.8)
    assert face["source"] == f"{tmp_path}/images/{fec_image_name('http://a/1.jpg')}"
    assert m.records[0]["faces"][0]["crop_id"] == m.records[1]["faces"][0]["crop_id"]  # same URL and box
    assert len(m.rejected) == 5
    assert any("tied" in r["reason"] for r in m.rejected)


def test_fec_image_names_are_flat_and_stable():
    name = fec_image_name("https://x.org/a/b/c.PNG?size=2")
    assert name == fec_image_name("https://x.org/a/b/c.PNG?size=2") and name.endswith(".png") and "/" not in name
    assert fec_image_name("https://x.org/noext").endswith(".jpg")
