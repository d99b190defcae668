"""No input stops a job, no transient fault loses data, no secret leaks (SPEC §6, issue 11):
extract_faces, distill and score_videos over every odd input at once, under injected S3 faults,
rerun after adding one input, and with credentials in the URI and the storage options."""

import glob
import io
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from aver.pipelines.distill import DistillConfig
from aver.pipelines.distill import run as distill
from aver.pipelines.extract import ExtractFacesConfig
from aver.pipelines.extract import run as extract
from aver.faults import RetryPolicy
from aver.io.parts import read_folder
from aver.pipelines.score import ScoreVideosConfig
from aver.pipelines.score import run as score
from tests.media_fixtures import face_images, face_video, hostile_corpus
from tests.ray_helpers import run_job, same_rows, start_ray_node, stop_ray_cluster, unique_rows
from aver.demo.s3proxy import S3Proxy, free_port

pytestmark = pytest.mark.timeout(600)
FAST = RetryPolicy(attempts=4, backoff_s=0.05)


def _name(source: str) -> str:
    return os.path.basename(source)


def _expected_by_name(expected: dict[str, str]) -> dict[str, str]:
    return {_name(k): v for k, v in expected.items()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return hostile_corpus(tmp_path_factory.mktemp("hostile") / "in")


def test_every_odd_input_gets_one_status_row_in_extract_faces(hostile, tmp_path, ray_local):
    manifest, expected, _ = hostile
    counts = extract(ExtractFacesConfig(input=manifest, output=str(tmp_path / "out"), actors=1, cpus_per_actor=0.5,
                                        retry=FAST))
    status = read_folder(str(tmp_path / "out" / "status")).to_pandas()
    assert status["video_id"].is_unique and len(status) == len(expected) == sum(counts.values())
    got = {_name(s): st for s, st in zip(status["source"], status["status"])}
    assert got == _expected_by_name(expected)
    assert status.loc[~status["status"].isin(["ok", "no_face"]), "error"].str.len().gt(0).all()
    faces = read_folder(str(tmp_path / "out" / "faces")).to_pandas()
    assert faces["crop_id"].is_unique
    by_name = {n: g.sort_values("frame_index") for n, g in faces.groupby(faces["source"].map(_name))}
    # the phone video is turned upright: faces on every frame, boxes inside the 240x320 portrait frame
    phone = by_name["phone.mp4"]
    assert len(phone) == 5 and phone["crop"].notna().all()
    assert all(0 <= b[0] < b[2] <= 240 and 0 <= b[1] < b[3] <= 320 for b in phone["box"])
    # the 10-hour header holds 5 real frames: 5 rows, a duration of 1 s
    row = status[status["source"].str.endswith("ten_hours.mkv")].iloc[0]
    assert len(by_name["ten_hours.mkv"]) == 5 and row["n_frames"] == 5 and row["duration_s"] == pytest.approx(1.0)
    assert by_name["strip.png"]["crop"].notna().all()  # the face in a 2000x40 strip is found
    for name in ("tiny2.mp4", "tiny16.mp4", "unknown.avi", "loop.mp4", "outside.mp4", "x.mp4", "empty.mp4", "text.mp4",
                 "truncated.mp4", "speech_only.m4a", "huge.png", "tiny.png"):
        assert name not in by_name
    # 2 s at 10 fps sampled at 5 fps: 10 rows per video, timestamps every 0.2 s
    assert len(by_name["face.mp4"]) == 10
    assert np.allclose(by_name["face.mp4"]["timestamp_s"], np.arange(10) * 0.2, atol=1e-3)
    assert by_name["face.mp4"]["crop"].notna().all() and by_name["portrait.mp4"]["crop"].notna().all()
    nf = by_name["noface.mp4"]
    assert len(nf) == 10 and nf[["box", "prob", "crop", "track_id"]].isna().all().all()
    # face for the first second only: crops then nulls, never invented values
    ftn = by_name["face_then_none.mp4"]["crop"].notna().tolist()
    assert ftn[:4] == [True] * 4 and ftn[-4:] == [False] * 4
    ntf = by_name["none_then_face.mp4"]["crop"].notna().tolist()
    assert ntf[:4] == [False] * 4 and ntf[-4:] == [True] * 4
    for name in ("gray.png", "rgba.png", "gray16.png"):
        assert by_name[name]["crop"].notna().all()
    crop = Image.open(io.BytesIO(by_name["portrait.mp4"]["crop"].iloc[0]))
    assert crop.size == (140, 140) and crop.mode == "RGB"
    box = by_name["portrait.mp4"]["box"].iloc[0]
    assert len(box) == 4 and 0 <= box[0] < box[2] <= 240 and 0 <= box[1] < box[3] <= 320


def test_every_odd_input_gets_one_status_row_in_score_videos(hostile, tmp_path, random_models, ray_local):
    manifest, _, expected = hostile
    out = tmp_path / "out"
    counts = score(ScoreVideosConfig(input=manifest, output=str(out), model=str(random_models), actors=1,
                                     cpus_per_actor=0.5, retry=FAST))
    status = read_folder(str(out / "status")).to_pandas()
    assert status["video_id"].is_unique and len(status) == len(expected) == sum(counts.values())
    assert {_name(s): st for s, st in zip(status["source"], status["status"])} == _expected_by_name(expected)
    names = dict(zip(status["video_id"], status["source"].map(_name)))
    scores = read_folder(str(out / "scores")).to_pandas()
    scores["name"] = scores["video_id"].map(names)
    scored = scores[scores["modality"] != "none"]
    assert np.isfinite(scored[["arousal", "valence"]].to_numpy()).all()  # no NaN anywhere a score is
    assert scores.loc[scores["modality"] == "none", ["arousal", "valence"]].isna().all().all()
    # bounded by what really decodes (1 s), not by the header's 10 hours: steps ending at 0.4 and 0.8 s
    assert sorted(set(scores.loc[scores["name"] == "ten_hours.mkv", "t_end_s"])) == pytest.approx([0.4, 0.8])
    phone = scores[(scores["name"] == "phone.mp4") & scores["track_id"].notna()]  # the person's rows, not the soundtrack's
    assert len(phone) and phone["face_detected"].all()
    # frames too small for a face: scored from the voice alone, the status says why
    assert set(scores.loc[scores["name"] == "tiny16.mp4", "modality"]) == {"audio"}
    assert (out / "report" / "index.html").exists()


def _parts(folder):
    return {os.path.basename(p): os.path.getmtime(p) for p in glob.glob(os.path.join(folder, "*.parquet"))}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from aver.models import Teacher, save_checkpoint

    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    save_checkpoint(Teacher(d_face=128).eval(), str(d / "t128.pt"))
    save_checkpoint(Teacher(d_face=256).eval(), str(d / "t256.pt"))
    return str(d / "t128.pt"), str(d / "t256.pt")


def test_adding_one_image_processes_that_image_only(tmp_path, teachers, ray_local):
    face_images(tmp_path / "in", 9)
    ecfg = ExtractFacesConfig(input=str(tmp_path / "in"), output=str(tmp_path / "faces"), images_per_unit=4,
                              actors=1, cpus_per_actor=0.5)
    dcfg = DistillConfig(input=str(tmp_path / "in"), teachers=teachers, output=str(tmp_path / "targets"),
                         images_per_unit=4, actors=1, cpus_per_actor=0.5)
    assert extract(ecfg) == {"ok": 9} and distill(dcfg) == {"ok": 9}
    before = {job: _parts(tmp_path / job / "status") for job in ("faces", "targets")}
    face_images(tmp_path / "in", 1, start=9)  # face009.jpg sorts last, so position-named chunks would all stay
    face_images(tmp_path / "in", 1, start=100)  # ... and face100.jpg sorts in between
    assert extract(ecfg) == {"ok": 2} and distill(dcfg) == {"ok": 2}
    for job, folder in (("faces", "faces"), ("targets", "targets")):
        after = _parts(tmp_path / job / "status")
        assert {k: v for k, v in after.items() if k in before[job]} == before[job]  # nothing rewritten
        assert len(after) == len(before[job]) + 1
        assert set(_parts(tmp_path / job / folder)) == set(after)  # one output part per status part
    faces = read_folder(str(tmp_path / "faces" / "faces")).to_pandas()
    assert len(faces) == 11 and faces["video_id"].is_unique
    targets = read_folder(str(tmp_path / "targets" / "targets")).to_pandas()
    assert len(targets) == 11 and targets["crop_id"].is_unique
    assert extract(ecfg) == {} and distill(dcfg) == {}


@pytest.fixture
def faulty(s3):
    proxy = S3Proxy(s3["endpoint"])
    yield proxy, proxy.options(s3["options"])
    proxy.close()


def _upload(fs, local, remote):
    for path in sorted(glob.glob(os.path.join(local, "*"))):
        fs.put(path, f"{remote}/{os.path.basename(path)}")


@pytest.mark.parametrize("job", ["extract_faces", "distill", "score_videos"])
def test_transient_s3_faults_are_retried_then_redone_by_a_rerun(job, tmp_path, s3, faulty, teachers, random_models,
                                                                 ray_local, capsys):
    import fsspec

    proxy, so = faulty
    fs = fsspec.filesystem("s3", **s3["options"])
    bucket = f"s3://{s3['bucket']}/{job}"
    if job == "score_videos":
        for i in range(3):
            face_video(tmp_path / "in" / f"talk{i}.mp4", seconds=1.2)
    else:
        face_images(tmp_path / "in", 6)
        face_video(tmp_path / "in" / "clip.mp4", seconds=1.0)
    _upload(fs, str(tmp_path / "in"), f"{bucket}/in")

    def run(output, **kw):
        common = dict(input=f"{bucket}/in/", output=f"{bucket}/{output}", actors=1, cpus_per_actor=0.5,
                      storage_options=so, retry=FAST, **kw)
        if job == "extract_faces":
            return extract(ExtractFacesConfig(images_per_unit=4, **common))
        if job == "distill":
            return distill(DistillConfig(teachers=teachers, images_per_unit=4, **common))
        return score(ScoreVideosConfig(model=str(random_models), **common))

    # 1. every request for the inputs fails for a while (3 requests): the retries absorb it, and
    # this run is the reference the faulty run's rows must equal in the end
    proxy.fail_next, proxy.fail_next_key = 3, "/in/"
    reference = run("blip")
    assert reference == {"ok": {"extract_faces": 7, "distill": 6, "score_videos": 3}[job]} and len(proxy.failed) == 3
    # 2. two inputs stay unreadable for the whole first run: failed, and only they
    victims = ["talk1.mp4", "talk2.mp4"] if job == "score_videos" else ["face002.jpg", "face004.jpg"]
    proxy.fail_keys = {f"/in/{v}" for v in victims}
    capsys.readouterr()
    first = run("faulty")
    assert first == {"ok": reference["ok"] - 2, "failed": 2}
    assert "2 inputs hit transient faults that outlived the retries: run the same command again" in capsys.readouterr().out
    id_col = "video_id" if job != "distill" else "item_id"
    status = read_folder(f"{bucket}/faulty/status", so).to_pandas()
    assert sorted(status.loc[status["status"] == "failed", "source"].map(_name)) == victims
    assert status.loc[status["status"] == "failed", "error"].str.contains("unavailable", case=False).all()
    # 3. the store recovers: the rerun does the two failed inputs and nothing else
    proxy.fail_keys = set()
    assert run("faulty") == {"ok": 2}
    assert run("faulty") == {}
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/faulty/_retry") or not fs.ls(f"{bucket}/faulty/_retry")
    out_folder, key = {"extract_faces": ("faces", ["crop_id"]), "distill": ("targets", ["crop_id"]),
                       "score_videos": ("scores", ["video_id", "track_id", "t_end_s"])}[job]
    for folder, k in ((out_folder, key), ("status", [id_col])):
        same_rows(unique_rows(f"{bucket}/blip/{folder}", so, k), unique_rows(f"{bucket}/faulty/{folder}", so, k), folder)


def _strings_in_parquet(path) -> str:
    return repr(pq.read_table(path).to_pylist())


def test_no_secret_in_output_logs_or_files(tmp_path, s3, random_models):
    import fsspec

    key, secret = "AKIAAVERSECRETKEY01", "sEcReT/aver+SHOULD_NEVER_SHOW_0123456789"
    leak = [key, secret, secret.replace("/", "%2F").replace("+", "%2B")]
    fs = fsspec.filesystem("s3", **s3["options"])
    bucket = s3["bucket"]
    face_video(tmp_path / "v.mp4", seconds=1.0)
    fs.put(str(tmp_path / "v.mp4"), f"{bucket}/sec/in/v.mp4")
    fs.pipe(f"{bucket}/sec/in/broken.mp4", b"not a video")
    # a manifest naming inputs with credentials inside (refused, and said so without them)
    (tmp_path / "list.txt").write_text(f"s3://{key}:{secret}@{bucket}/sec/in/v.mp4\n"
                                       f"s3://{key}:{leak[2]}@Bad_Bucket!/sec/in/v.mp4\n")
    # The three jobs on one Ray head of this test's own (its logs all under ray_tmp), as drivers
    # joining a running cluster; no credentials in its environment.
    ray_tmp = f"/tmp/aver-secret-{os.getpid()}"
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "RAY_AUTH_MODE": "disabled"}
    gcs = f"127.0.0.1:{free_port()}"
    endpoint = {"client_kwargs": {"endpoint_url": s3["endpoint"]}}
    import json

    try:
        start_ray_node(["--head", "--num-cpus=2", f"--port={gcs.rsplit(':', 1)[1]}", "--include-dashboard=false",
                        f"--ray-client-server-port={free_port()}"], ray_tmp,
                       dict(os.environ, **env, RAY_USAGE_STATS_ENABLED="0",
                            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")))
        env["RAY_ADDRESS"] = gcs
        runs = [
            run_job(["jobs/extract_faces.py", "--input", f"s3://{leak[0]}:{leak[2]}@{bucket}/sec/in/",
                     "--output", str(tmp_path / "faces"), "--actors", "1", "--cpus-per-actor", "0.5",
                     "--storage-options", json.dumps(endpoint)], env=env),
            run_job(["jobs/score_videos.py", "--input", f"s3://{bucket}/sec/in/", "--output",
                     f"s3://{bucket}/sec/scores", "--model", str(random_models), "--actors", "1",
                     "--cpus-per-actor", "0.5",
                     "--storage-options", json.dumps({**endpoint, "key": key, "secret": secret})], env=env),
            run_job(["jobs/extract_faces.py", "--input", str(tmp_path / "list.txt"), "--output",
                     str(tmp_path / "listed"), "--actors", "1", "--cpus-per-actor", "0.5"], env=env),
        ]
        for r in runs:
            assert r.returncode == 0, r.stderr[-3000:]
            for s in leak:
                assert s not in r.stdout and s not in r.stderr
        assert "ok=1" in runs[0].stdout and "corrupt=1" in runs[0].stdout
        assert "unsupported=2" in runs[2].stdout
        logs = [p for p in glob.glob(f"{ray_tmp}/**/*", recursive=True) if os.path.isfile(p)]
        assert any(p.endswith("ray-data.log") for p in logs)
        for p in logs:
            data = open(p, "rb").read()
            for s in leak:
                assert s.encode() not in data, p
        fs.get(f"{bucket}/sec/scores", str(tmp_path / "scores"), recursive=True)
        outputs = [p for d in ("faces", "scores", "listed") for p in glob.glob(f"{tmp_path}/{d}/**/*", recursive=True)
                   if os.path.isfile(p)]
        assert len(outputs) >= 8
        for p in outputs:
            text = _strings_in_parquet(p) if p.endswith(".parquet") else open(p, "rb").read().decode("latin-1")
            for s in leak:
                assert s not in text, p
    finally:
        stop_ray_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
