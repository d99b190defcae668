import pytest
from PIL import Image
import io

from aver.pipelines.extract import ExtractFacesConfig, run
from aver.io.parts import read_folder
from tests.media_fixtures import face_patch, face_video
from tests.ray_helpers import kill_midway

pytestmark = pytest.mark.timeout(400)


def _cfg(inp, out, **kw):
    return ExtractFacesConfig(input=str(inp), output=str(out), cpus_per_actor=0.5, actors=1, **kw)


def test_killed_job_rerun_equals_uninterrupted(tmp_path, ray_local, capsys):
    # Also what a plain rerun must do: skip the complete units, write no row twice (an input added
    # later is processed alone: tests/pipelines/test_fault_isolation.py, adding one image).
    for i in range(4):
        face_video(tmp_path / "in" / f"v{i}.mp4", seconds=2.0)
    # one record per model call: the units complete one by one, so the kill lands between them
    assert run(_cfg(tmp_path / "in", tmp_path / "clean", records_per_call=1)) == {"ok": 4}  # the reference
    args = ["jobs/extract_faces.py", "--input", str(tmp_path / "in"), "--cpus-per-actor", "0.5", "--actors", "1",
            "--records-per-call", "1"]
    n_done = kill_midway(args, tmp_path / "killed", 4)
    capsys.readouterr()
    assert run(_cfg(tmp_path / "in", tmp_path / "killed", records_per_call=1)) == {"ok": 4 - n_done}  # the rerun
    assert f"{n_done} units already complete" in capsys.readouterr().out
    key = ["video_id", "frame_index"]
    a = read_folder(str(tmp_path / "clean" / "faces")).to_pandas().sort_values(key).reset_index(drop=True)
    b = read_folder(str(tmp_path / "killed" / "faces")).to_pandas().sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 4 * 10
    assert a[key + ["timestamp_s", "prob", "crop"]].equals(b[key + ["timestamp_s", "prob", "crop"]])
    sa = read_folder(str(tmp_path / "clean" / "status")).to_pandas().sort_values("video_id").reset_index(drop=True)
    sb = read_folder(str(tmp_path / "killed" / "status")).to_pandas().sort_values("video_id").reset_index(drop=True)
    assert sa.equals(sb)


def test_s3_input_and_output(tmp_path, s3, ray_local):
    import fsspec

    fs = fsspec.filesystem("s3", **s3["options"])
    face_video(tmp_path / "v.mp4", seconds=1.0)
    fs.put(str(tmp_path / "v.mp4"), f"{s3['bucket']}/in/v.mp4")
    fs.pipe(f"{s3['bucket']}/in/broken.mp4", b"not a video")
    cfg = _cfg(f"s3://{s3['bucket']}/in/", f"s3://{s3['bucket']}/run1", storage_options=s3["options"])
    assert run(cfg) == {"ok": 1, "corrupt": 1}
    status = read_folder(f"s3://{s3['bucket']}/run1/status", s3["options"]).to_pandas()
    assert sorted(status["status"]) == ["corrupt", "ok"]
    assert all(s.startswith("s3://aver-test/in/") for s in status["source"])
    faces = read_folder(f"s3://{s3['bucket']}/run1/faces", s3["options"]).to_pandas()
    assert len(faces) == 5 and faces["crop"].notna().all()
    assert run(cfg) == {}  # complete on S3 too: nothing redone


def test_zip_archive_of_face_crops(tmp_path, ray_local):
    import zipfile

    buf = io.BytesIO()
    Image.fromarray(face_patch(160)).save(buf, format="JPEG")
    with zipfile.ZipFile(tmp_path / "powderfaces.zip", "w") as z:
        z.writestr("p/0001.jpg", buf.getvalue())
        z.writestr("p/0002.jpg", buf.getvalue())
        z.writestr("p/0003.jpg", b"broken")
    assert run(_cfg(tmp_path / "powderfaces.zip", tmp_path / "out")) == {"ok": 2, "corrupt": 1}
    faces = read_folder(str(tmp_path / "out" / "faces")).to_pandas()
    assert len(faces) == 2 and faces["crop"].notna().all()
    assert faces["source"].str.startswith("zip://p/000").all()
