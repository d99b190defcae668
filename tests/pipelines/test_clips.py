"""Long videos read as clips (issue 28): a clipped run gives what a whole read gives, and a rerun
reads only the clips no run committed. The two-node run, with a node killed mid-video, is in
tests/pipelines/test_two_nodes.py."""

import json
import os

import numpy as np
import pytest

from aver.io.parts import read_folder
from aver.pipelines.extract import ExtractFacesConfig
from aver.pipelines.extract import run as extract
from aver.pipelines.ledger import CLIPS, Unit, clip_names, plan_clips
from aver.pipelines.score import ScoreVideosConfig
from aver.pipelines.score import run as score
from tests.media_fixtures import face_patch
from tests.ray_helpers import same_rows

pytestmark = pytest.mark.timeout(500)


def long_take(path, seconds: float = 6.0, fps: int = 10, cut_s: float = 3.2) -> None:
    """A face moving across the frame the whole time, a shot cut (the background changes) at
    ``cut_s``, a voice that changes pitch every 0.5 s; a keyframe every second."""
    from aver.demo.media import write_video

    patch = face_patch(110)
    frames = []
    for i in range(int(seconds * fps)):
        img = np.full((240, 320, 3), (90, 90, 90) if i / fps < cut_s else (40, 60, 200), np.uint8)
        x = 10 + int(150 * i / (seconds * fps))
        img[60:60 + patch.shape[0], x:x + patch.shape[1]] = patch
        frames.append(img)
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = 180 + 60 * (np.floor(t / 0.5) % 3)
    voice = (0.3 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    write_video(str(path), iter(frames), fps, audio=voice, keyframe_every=fps)


def _table(out, folder, key):
    df = read_folder(str(out / folder)).to_pandas()
    return df.sort_values(key).reset_index(drop=True)


def test_a_clipped_run_equals_a_whole_read(tmp_path, random_models, ray_local, capsys):
    # Guards against: frames lost or doubled at a clip boundary, ids counted from a seek, a face
    # track cut at every boundary, a shot cut at a boundary missed, the audio cut at clip edges.
    os.makedirs(tmp_path / "in")
    long_take(tmp_path / "in" / "take.mp4")  # clips of 1.6 s: boundaries at 1.6, 3.2 (the cut), 4.8
    runs = {}
    for name, clip_s in (("whole", 0.0), ("clips", 1.6)):
        out = tmp_path / name
        assert score(ScoreVideosConfig(input=str(tmp_path / "in"), output=str(out / "score"), model=str(random_models),
                                       clip_s=clip_s, actors=1, cpus_per_actor=0.5)) == {"ok": 1}
        assert extract(ExtractFacesConfig(input=str(tmp_path / "in"), output=str(out / "faces"), clip_s=clip_s,
                                          actors=1, cpus_per_actor=0.5)) == {"ok": 1}
        runs[name] = out
    log = capsys.readouterr().out
    assert log.count("1 long inputs in 5 clips; 5 to read, 0 read before") == 1  # 4 video clips + the audio
    assert log.count("1 long inputs in 4 clips; 4 to read, 0 read before") == 1  # extract_faces: no audio
    whole, clips = runs["whole"], runs["clips"]
    for folder, key in (("score/scores", ["track_id", "t_end_s"]), ("score/tracks", ["track_id"]),
                        ("score/summary", ["video_id"]), ("score/status", ["video_id"]),
                        ("faces/faces", ["crop_id"]), ("faces/status", ["video_id"])):
        same_rows(_table(whole, folder, key), _table(clips, folder, key), folder)
    summary = _table(clips, "score/summary", ["video_id"]).iloc[0]
    assert summary["n_cuts"] == 1 and summary["has_audio"]  # the cut at the clip boundary was seen
    faces = _table(clips, "faces/faces", ["crop_id"])
    assert len(faces) == 30 and faces["crop"].notna().sum() >= 14 and faces["crop_id"].is_unique
    assert (np.diff(faces["timestamp_s"]) > 0).all()
    # where each clip was read is recorded; a finished input keeps none of its clips
    part = _table(clips, "score/clips", ["clip"])
    assert part["clip"].tolist() == clip_names(1.6, 5.0, 4, True) and part["used"].all()
    assert part["start_s"].tolist()[:4] == [0.0, 1.6, 3.2, 4.8] and part["node_id"].notna().all()
    assert not [f for _, _, fs in os.walk(clips / "score" / CLIPS) for f in fs]


def test_a_rerun_plans_only_the_clips_not_committed(tmp_path):
    # Guards against: a rerun reading clips again that a killed run committed, clips of other
    # settings mixed in, the finalize-only case (every clip committed, the input not) lost.
    out = tmp_path / "out"
    item = {"source": "/v/a.mp4", "item_id": "a-1", "kind": "video"}
    names = clip_names(60.0, 5.0, 3, True)
    folder = out / CLIPS / "a-1"
    os.makedirs(folder / names[0])
    (folder / f"{names[0]}.done").write_text(json.dumps({"n_segments": 1}))
    (folder / f"{names[2]}.failed").write_text(json.dumps({"n_segments": 1}))  # read again
    stale = clip_names(30.0, 5.0, 5, True)[0]
    os.makedirs(folder / stale)
    (folder / f"{stale}.done").write_text("{}")
    os.makedirs(out / CLIPS / "gone-2")  # an input complete since
    units, finalize = plan_clips(str(out), None, [Unit("a-1", [item])], {"a-1": (150.0, 0.04)}, clip_s=60.0, fps=5.0,
                                 audio=True, max_duration_s=4 * 3600)
    assert [u.unit_id for u in units] == [f"a-1.{n}" for n in names[1:]] and not finalize
    assert [(u.clip.range.start_s, u.clip.range.end_s) if u.clip.range else None for u in units] == \
        [(60.0, 120.0), (120.0, None), None]
    assert units[0].clip.range.origin_s == 0.04 and units[0].clip.input.unit_id == "a-1"
    assert sorted(os.listdir(folder)) == sorted([names[0], f"{names[0]}.done"])
    assert os.listdir(out / CLIPS) == ["a-1"]
    for name in names[1:]:
        (folder / f"{name}.done").write_text("{}")
    units, finalize = plan_clips(str(out), None, [Unit("a-1", [item])], {"a-1": (150.0, 0.04)}, clip_s=60.0, fps=5.0,
                                 audio=True, max_duration_s=4 * 3600)
    assert units == [] and [c.input.unit_id for c in finalize] == ["a-1"]
    # a header past --max-duration-s: clips up to the limit, the last one open-ended (reading decides)
    units, _ = plan_clips(str(tmp_path / "o2"), None, [Unit("a-1", [item])], {"a-1": (36000.0, 0.0)}, clip_s=60.0,
                          fps=5.0, audio=False, max_duration_s=300.0)
    assert len(units) == 5 and units[-1].clip.range.end_s is None


def test_video_clips_after_the_one_whose_stream_broke_are_left_out(tmp_path):
    # Guards against: a stream broken inside a clip ending nothing (the clips after it, read from
    # their own keyframes, would add frames a whole read never reaches); the audio left out with them.
    import pickle

    from aver.io.media import ClipRange
    from aver.pipelines.extract import ExtractFacesConfig
    from aver.pipelines.ledger import Clip
    from aver.pipelines.stages import Record, _finalize

    cfg = ExtractFacesConfig(input=str(tmp_path), output=str(tmp_path / "out"))
    item = {"source": "/v/a.mp4", "item_id": "a-1", "kind": "video"}
    names = clip_names(60.0, 5.0, 3, True)
    ranges = [ClipRange(0.0, 60.0, 0.0), ClipRange(60.0, 120.0, 0.0), ClipRange(120.0, None, 0.0), None]
    whole = Unit("a-1", [item])
    folder = tmp_path / "out" / CLIPS / "a-1"
    for k, name in enumerate(names):
        clip = Clip(whole, name, names, ranges)
        os.makedirs(folder / name)
        (folder / name / "000000.pkl").write_bytes(pickle.dumps(Record(unit=Unit(f"a-1.{name}", [item], clip=clip))))
        (folder / f"{name}.done").write_text(json.dumps({"n_segments": 1, "ends": k == 1, "node": "n", "run": "r"}))
    seen = []

    def commit(unit, records, cfg):
        seen.extend(r.unit.clip.name for r in records())
        return [{"video_id": unit.unit_id, "status": "ok"}]

    assert json.loads(_finalize(commit, Clip(whole, names[0], names, ranges), cfg, "video_id"))["counts"] == {"ok": 1}
    assert seen == [names[0], names[1], names[3]]  # the clip after the break is not read; the audio is
    part = read_folder(str(tmp_path / "out" / "clips")).to_pandas()
    assert part["used"].tolist() == [True, True, False, True] and not folder.exists()
