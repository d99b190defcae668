import os
import shutil

import numpy as np
import pytest
import torch

from aver.io.parts import read_folder
from aver.pipelines.score import ScoreVideosConfig, run
from tests.media_fixtures import face_video
from tests.ray_helpers import kill_midway, same_rows

pytestmark = pytest.mark.timeout(500)

# The demo corpus's archive: what each input holds and how it must come out.
EXPECTED = {  # name: (status, modalities its rows may use)
    "interview.mp4": ("ok", {"audio+visual", "audio"}),
    "face_leaves.mp4": ("ok", {"audio+visual", "audio"}),
    "silent_face.mp4": ("no_audio", {"visual"}),
    "no_face.mp4": ("no_face", {"audio"}),
    "podcast.wav": ("ok", {"audio"}),
    "broken.mp4": ("corrupt", set()),
}


def test_mixed_archive_rows_flags_status_and_report(tmp_path, small_corpus, random_models, ray_local):
    out = tmp_path / "out"
    counts = run(ScoreVideosConfig(input=str(small_corpus / "archive"), output=str(out), model=str(random_models),
                                   cpus_per_actor=0.5, actors=1))
    assert sum(counts.values()) == len(EXPECTED)
    status = read_folder(str(out / "status")).to_pandas()
    assert len(status) == len(EXPECTED) and status["video_id"].is_unique
    got = {os.path.basename(s): st for s, st in zip(status["source"], status["status"])}
    assert got == {k: v[0] for k, v in EXPECTED.items()}
    scores = read_folder(str(out / "scores")).to_pandas()
    names = dict(zip(status["video_id"], (os.path.basename(s) for s in status["source"])))
    scores["name"] = scores["video_id"].map(names)
    assert "broken.mp4" not in set(scores["name"])
    summary = read_folder(str(out / "summary")).to_pandas().set_index("video_id")
    people = summary["n_people"].groupby(summary.index.map(names)).sum()
    for name, rows in scores.groupby("name"):
        assert set(rows["modality"]) <= EXPECTED[name][1], name
        assert rows[["arousal", "valence"]].notna().all().all() and rows[["arousal", "valence"]].abs().le(1).all().all()
        # 12 s inputs, 0.4 s steps: the soundtrack's series at every step (when there is audio) ...
        sound = rows[rows["track_id"].isna()]
        assert len(sound) == (0 if name == "silent_face.mp4" else 30), name
        assert sound.empty or np.allclose(np.sort(sound["t_end_s"]), np.arange(1, 31) * 0.4)
        assert (sound["modality"] == "audio").all() and not sound["face_detected"].any()
        assert sound["expression_probs"].isna().all()
        # ... and the primary person's rows only at steps where their face is on screen
        face = rows[rows["track_id"].notna()]
        assert face["track_id"].nunique() <= 1 and len(rows) <= 30 * people[name] + 30, name
        assert (face["modality"] == ("visual" if name == "silent_face.mp4" else "audio+visual")).all()
        has_face = face["face_detected"]
        assert face.loc[has_face, "expression_probs"].map(lambda p: abs(sum(p) - 1) < 1e-4).all()
    by_name = {n: g[g["track_id"].notna()].sort_values("t_end_s") for n, g in scores.groupby("name")}
    # MTCNN misses some drawn faces (expressions it has never seen), never the faceless frames
    assert by_name["interview.mp4"]["face_detected"].any() and by_name["silent_face.mp4"]["face_detected"].any()
    assert by_name["no_face.mp4"].empty and people["no_face.mp4"] == 0
    # the face leaves halfway through (6 s): no rows of it after, where the soundtrack goes on alone
    leaves = by_name["face_leaves.mp4"]
    assert len(leaves) and leaves["t_start_s"].max() < 6.0 + 2.0
    tracks = read_folder(str(out / "tracks")).to_pandas()
    assert set(tracks["video_id"].map(names)) == {n for n in people.index if people[n]}
    assert tracks.groupby("video_id")["primary"].sum().eq(1).all()
    from PIL import Image
    import io as _io
    assert all(Image.open(_io.BytesIO(c)).size == (64, 64) for c in tracks["crop"])
    assert (summary["scoring_version"] == 2).all() and (status["scoring_version"] == 2).all()
    assert sorted(summary.index.map(names)) == sorted(n for n in EXPECTED if n != "broken.mp4")
    assert summary.loc[summary.index.map(names) == "silent_face.mp4", "has_audio"].item() is False
    assert summary.loc[summary.index.map(names) == "no_face.mp4", "dominant_expression"].isna().all()
    report = out / "report"
    html = (report / "index.html").read_text()
    for vid in status["video_id"]:
        assert vid in html
    assert (report / "circumplex.png").stat().st_size > 5000
    pngs = {p.stem for p in report.glob("*.png")} - {"circumplex"}
    assert pngs == set(summary.index)
    # a rerun finds everything complete and rewrites nothing but the report
    again = run(ScoreVideosConfig(input=str(small_corpus / "archive"), output=str(out), model=str(random_models),
                                  cpus_per_actor=0.5, actors=1))
    assert again == {} and len(read_folder(str(out / "scores")).to_pandas()) == len(scores)


def test_killed_job_rerun_equals_uninterrupted(tmp_path, random_models, ray_local, capsys):
    src = tmp_path / "in"
    for i in range(4):  # a face and a voice, 2.4 s: six 0.4 s steps each
        face_video(src / f"talk{i}.mp4", seconds=2.4)
    # one record per model call: the units complete one by one, so the kill lands between them
    cfg = lambda out: ScoreVideosConfig(input=str(src), output=str(tmp_path / out), model=str(random_models),  # noqa: E731
                                        cpus_per_actor=0.5, actors=1, records_per_call=1)
    assert run(cfg("clean")) == {"ok": 4}  # the reference
    args = ["jobs/score_videos.py", "--input", str(src), "--model", str(random_models), "--cpus-per-actor", "0.5",
            "--actors", "1", "--records-per-call", "1"]
    n_done = kill_midway(args, tmp_path / "killed", 4, timeout=300)
    capsys.readouterr()
    assert run(cfg("killed")) == {"ok": 4 - n_done}  # the rerun, in this process's Ray
    assert f"{n_done} already complete" in capsys.readouterr().out
    key = ["video_id", "track_id", "t_end_s"]
    a = read_folder(str(tmp_path / "clean" / "scores")).to_pandas().sort_values(key).reset_index(drop=True)
    b = read_folder(str(tmp_path / "killed" / "scores")).to_pandas().sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == 4 * (6 + 6) and a["arousal"].notna().all()  # the face's and the soundtrack's
    same_rows(a, b, "scores")  # the rerun's inputs met other inputs' frames in their model batches
    sa = read_folder(str(tmp_path / "clean" / "status")).to_pandas().sort_values("video_id").reset_index(drop=True)
    sb = read_folder(str(tmp_path / "killed" / "status")).to_pandas().sort_values("video_id").reset_index(drop=True)
    assert sa.equals(sb)


def _two_faces(path, seconds=3.0, fps=10):
    from aver.demo.media import write_video
    from tests.media_fixtures import face_patch, tone

    big, small = face_patch(120), face_patch(80)
    frames = []
    for _ in range(int(seconds * fps)):
        img = np.full((240, 400, 3), 90, np.uint8)
        img[60:180, 10:10 + big.shape[1]] = big
        img[80:160, 260:260 + small.shape[1]] = small
        frames.append(img)
    write_video(str(path), iter(frames), fps, audio=tone(seconds))


def test_all_faces_scores_every_track_and_the_default_only_the_primary(tmp_path, random_models):
    from aver.io.media import list_inputs
    from aver.pipelines.ledger import Unit
    from aver.pipelines.score import VideoScorer, load_unit, write_unit
    from tests.pipelines.in_process import run_unit

    (tmp_path / "in").mkdir()
    _two_faces(tmp_path / "in" / "two.mp4")
    item = list_inputs(str(tmp_path / "in"))[0]
    found = {}
    for all_faces in (False, True):
        out = tmp_path / f"out{int(all_faces)}"
        cfg = ScoreVideosConfig(input=str(tmp_path / "in"), output=str(out), model=str(random_models),
                                all_faces=all_faces)
        [status] = run_unit(Unit(item.item_id, [vars(item)]), cfg, load_unit, VideoScorer(cfg), write_unit)
        assert status["status"] == "ok"
        found[all_faces] = read_folder(str(out / "scores")).to_pandas()
    one, every = found[False], found[True]
    # 3 s: steps ending at 0.4, 0.8, ... 2.8 s; the soundtrack's series and the people's
    assert one["track_id"].nunique() == 1 and len(one) == 2 * 7
    assert every["track_id"].nunique() == 2 and len(every) == 3 * 7
    assert (every.loc[every["track_id"].isna(), "modality"] == "audio").all()
    assert (every.loc[every["track_id"].notna(), "modality"] == "audio+visual").all()
    primary = one["track_id"].dropna().iloc[0]
    # the primary person (larger face) scores the same with or without --all-faces
    same = every[every["track_id"] == primary].reset_index(drop=True)
    assert np.allclose(same["arousal"], one[one["track_id"] == primary]["arousal"].reset_index(drop=True), atol=1e-6)
    tracks = read_folder(str(tmp_path / "out1" / "tracks")).to_pandas()
    assert len(tracks) == 2 and tracks.loc[tracks["primary"], "track_id"].item() == primary


def _direct_audio_scores(wav: str, models, ends, model_file: str, window_s=9.6):
    """What score_videos must write for an audio-only input, computed without its code: log-mel ->
    both VGGish networks' frame features (0.32 s steps) -> the window ending at each step,
    resampled by nearest index to 30 steps -> the fusion model with no visual input."""
    from aver.audio import log_mel
    from aver.io.media import read_audio
    from aver.models import load_checkpoint

    mel = log_mel(torch.from_numpy(read_audio(wav)), 16000)[None, None]
    with torch.no_grad():
        feats = torch.cat([load_checkpoint(str(models / f"vggish_{d}.pt"))[0].eval().frame_features(mel)[0]
                           for d in ("arousal", "valence")], dim=1).numpy()
        fusion = load_checkpoint(str(models / model_file))[0].eval()
        times = np.arange(len(feats)) * 0.32
        out = []
        for end in ends:
            inside = np.where((times >= max(0.0, end - window_s) - 1e-6) & (times < end - 1e-6))[0]
            pick = inside[np.minimum(np.arange(30) * len(inside) // 30, len(inside) - 1)]
            audio = torch.from_numpy(feats[pick][None].astype(np.float32))
            out.append(fusion(torch.zeros(1, 48, 1920), audio)[0].numpy())
    return np.array(out)


def test_audio_rows_equal_a_direct_forward_and_the_fallback_zeroes_the_missing_face(
        tmp_path, small_corpus, random_models, ray_local):
    # Guards against: arousal and valence swapped in the output, the wrong window for a row, and a
    # one-modality fallback (no fusion_audio.pt) that does anything but zero the visual input.
    (tmp_path / "in").mkdir()
    shutil.copy(small_corpus / "archive" / "podcast.wav", tmp_path / "in" / "podcast.wav")
    partial = tmp_path / "models"
    shutil.copytree(random_models, partial)
    (partial / "fusion_audio.pt").unlink()
    for models, model_file in ((random_models, "fusion_audio.pt"), (partial, "fusion.pt")):
        out = tmp_path / f"out-{model_file}"
        run(ScoreVideosConfig(input=str(tmp_path / "in"), output=str(out), model=str(models), cpus_per_actor=0.5,
                              actors=1))
        rows = read_folder(str(out / "scores")).to_pandas().sort_values("t_end_s")
        assert (rows["modality"] == "audio").all() and len(rows) == 30
        expected = _direct_audio_scores(str(tmp_path / "in" / "podcast.wav"), models, rows["t_end_s"].to_numpy(),
                                        model_file)
        assert np.allclose(rows["arousal"], expected[:, 0], atol=1e-4)
        assert np.allclose(rows["valence"], expected[:, 1], atol=1e-4)
        assert not np.allclose(expected[:, 0], expected[:, 1], atol=1e-3)


def test_streamed_windows_equal_windows_cut_from_the_whole_timelines(tmp_path):
    # Guards against: windows fused as they stream by (segment after segment, only the last
    # window_s of frames held) that differ from the windows training cuts from a whole recording:
    # a frame dropped or doubled at a segment boundary, the centring mean of a partial video, a
    # batch that mixes rows up. The stub fusion model sums its inputs, so each row says which
    # window it was given.
    from aver.data.features import AUDIO_DIM, VISUAL_DIM, centred, take, window_shape
    from aver.faces import Detection
    from aver.pipelines.ledger import Unit
    from aver.pipelines.score import FaceOut, ScoreRecord, _first_pass, score_rows

    class Sums(torch.nn.Module):
        def forward(self, vis, aud):
            return torch.stack([vis.double().sum((1, 2)), aud.double().sum((1, 2))], 1)

    rng = np.random.default_rng(3)
    fps, n, per_segment = 5.0, 120, 7  # 24 s in segments of 7 frames: windows span several
    times = np.arange(n) / fps
    present = np.ones(n, bool)
    present[40:48] = False  # the face missed for 1.6 s (one track: the tracker waits 2 s)
    embeddings = rng.normal(size=(n, VISUAL_DIM)).astype(np.float16) + np.float16(2.0)
    box = np.array([10, 10, 90, 90], np.float32)
    unit = Unit("v", [])
    records = []
    for s in range(0, n, per_segment):
        detected = [(i, float(times[i]), False,
                     [(Detection(box, 0.99), FaceOut(embeddings[i], np.full(8, 0.125), b""))] if present[i] else [])
                    for i in range(s, min(n, s + per_segment))]
        records.append(ScoreRecord(unit=unit, detected=detected))
    audio = rng.normal(size=(75, AUDIO_DIM)).astype(np.float32)
    records.append(ScoreRecord(unit=unit, audio=audio))
    cfg = ScoreVideosConfig(input="x", output=str(tmp_path), model="m", batch_size=5)
    people, timeline, _ = _first_pass(lambda: iter(records), cfg)
    assert list(people.counts) == [0] and people.counts[0] == present.sum()
    assert timeline is not None and len(timeline.features) == 75
    model = Sums()
    rows = score_rows(cfg, "v", n / fps, lambda: iter(records), people, [people.primary], timeline,
                      {"fused": model, "visual": model, "audio": model})
    sound = [r for r in rows if r["track_id"] is None]
    rows = [r for r in rows if r["track_id"] == 0]
    assert len(sound) == len(rows) and all(r["arousal"] == 0 for r in sound)  # no face in the soundtrack's
    tv, ta = window_shape(cfg.window_s, fps)
    vis_all = centred(embeddings.astype(np.float32), present)  # the whole recording's, as training cuts
    aud_all = centred(audio)
    aud_times = np.arange(75) * 0.32
    assert len(rows) == int(round(n / fps / cfg.hop_s))
    for row in rows:
        end = row["t_end_s"]
        w_start = max(0.0, end - cfg.window_s)
        assert np.isclose(row["arousal"], take(times, vis_all, w_start, end, tv).astype(np.float64).sum(), rtol=1e-4)
        assert np.isclose(row["valence"], take(aud_times, aud_all, w_start, end, ta).astype(np.float64).sum(),
                          rtol=1e-4, atol=1e-3)
    for row, face_row in zip(sound, rows):  # the soundtrack's window is the face's, without the face
        assert (row["t_end_s"], row["valence"]) == (face_row["t_end_s"], face_row["valence"])


class _TintIdentity:
    """An identity network for the tests: a face crop's mean colour, which the scenes tint per person."""

    def embed(self, crops, batch_size=64):  # crops: [K,3,H,W] uint8 on the scorer's device
        x = crops.float().mean((2, 3)).cpu().numpy()
        x -= x.mean(1, keepdims=True)  # the tint, not the brightness
        return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("scene", ["cut_and_back", "leave_and_return"])
def test_people_link_across_a_cut_and_a_long_absence_and_have_rows_only_on_screen(tmp_path, random_models, scene):
    # Guards against: a person cut away from (or gone for 3 s) and back counted twice, the other person
    # framed alike taking the first one's track at a cut, and rows for a person who is not on screen.
    from aver.io.media import list_inputs
    from aver.pipelines.ledger import Unit
    from aver.pipelines.score import VideoScorer, load_unit, write_unit
    from tests.pipelines.in_process import run_unit
    from tests.tracking_scenes import SCENES, render

    truth = SCENES[scene]()
    (tmp_path / "in").mkdir()
    render(truth, str(tmp_path / "in" / f"{scene}.mp4"))
    item = list_inputs(str(tmp_path / "in"))[0]
    cfg = ScoreVideosConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(random_models),
                            all_faces=True)
    scorer = VideoScorer(cfg)
    scorer.identity = _TintIdentity()
    [status] = run_unit(Unit(item.item_id, [vars(item)]), cfg, load_unit, scorer, write_unit)
    assert status["status"] == "ok"
    summary = read_folder(str(tmp_path / "out" / "summary")).to_pandas().iloc[0]
    assert summary["n_people"] == 2 and summary["n_cuts"] == (2 if scene == "cut_and_back" else 0)
    tracks = read_folder(str(tmp_path / "out" / "tracks")).to_pandas().set_index("track_id")
    assert len(tracks) == 2 and tracks["n_tracks"].max() == 2  # one person made of two tracks
    scores = read_folder(str(tmp_path / "out" / "scores")).to_pandas()
    steps = 45 / 5 / cfg.hop_s
    assert len(scores) <= steps * 2 + steps  # at most two people on screen, and the soundtrack
    twice = tracks.index[tracks["n_tracks"] == 2].item()
    away = scores[(scores["track_id"] == twice) & (scores["t_start_s"] > 3.4) & (scores["t_end_s"] < 5.6)]
    assert away.empty  # frames 15-29 (3-6 s): the person is not on screen, so no rows of theirs
    assert (scores["track_id"] == twice).sum() >= 0.8 * 2 * 3 / cfg.hop_s


def test_the_identity_network_runs_in_the_job_from_a_weights_file(tmp_path, random_models):
    from aver.io.media import list_inputs
    from aver.models import IdentityNet
    from aver.pipelines.ledger import Unit
    from aver.pipelines.score import VideoScorer, load_unit, write_unit
    from tests.pipelines.in_process import run_unit

    torch.manual_seed(0)
    torch.save(IdentityNet().net.state_dict(), tmp_path / "facenet.pt")  # random weights, facenet-pytorch's layout
    (tmp_path / "in").mkdir()
    _two_faces(tmp_path / "in" / "two.mp4", seconds=1.2)
    item = list_inputs(str(tmp_path / "in"))[0]
    cfg = ScoreVideosConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(random_models),
                            all_faces=True, identity_model=str(tmp_path / "facenet.pt"))
    [status] = run_unit(Unit(item.item_id, [vars(item)]), cfg, load_unit, VideoScorer(cfg), write_unit)
    assert status["status"] == "ok"
    assert len(read_folder(str(tmp_path / "out" / "tracks"))) == 2  # two faces side by side: never one person


def test_an_output_folder_of_another_scoring_version_is_refused_with_what_to_do(tmp_path):
    from aver.io.parts import write_table, status_table
    from aver.pipelines.score import SCORING_VERSION, check_version

    cfg = ScoreVideosConfig(input="i", output=str(tmp_path / "new"), model="m")
    check_version(cfg)  # a new folder is marked with this version ...
    assert (tmp_path / "new" / "VERSION").read_text().strip() == str(SCORING_VERSION)
    check_version(cfg)  # ... and accepted again
    old = tmp_path / "old"  # scored before outputs carried a version: status parts, no VERSION
    write_table(str(old / "status" / "a.parquet"), status_table([{"video_id": "a", "status": "ok"}]))
    with pytest.raises(ValueError, match="scoring version 1.*new --output"):
        check_version(ScoreVideosConfig(input="i", output=str(old), model="m"))
    assert not (old / "VERSION").exists()
