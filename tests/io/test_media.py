import io
import os

import numpy as np
import pytest
from PIL import Image

from aver.faults import MediaError
from aver.demo.media import write_video
from aver.io.media import ClipRange, VideoReader, item_id_for, list_inputs, load_image, probe_video, read_audio
from tests.media_fixtures import audio_only, face_video


def test_frames_follow_presentation_timestamps_with_variable_frame_rate(tmp_path):
    import av
    from fractions import Fraction

    # Variable frame rate: frames 0.1 s apart, then 0.4 s apart; index/fps would be wrong.
    path = tmp_path / "vfr.mp4"
    times = [0.0, 0.1, 0.2, 0.3, 0.7, 1.1, 1.5, 1.9]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for t in times:
            fr = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            fr.pts = int(t * 1000)
            fr.time_base = Fraction(1, 1000)
            for p in s.encode(fr):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with VideoReader(str(path)) as r:
        got = [(f.index, f.timestamp_s) for f in r.frames(fps=5)]
        rate = float(r._container.streams.video[0].average_rate)
    # one frame per 0.2 s slot, the first whose PTS reaches it: 0.0, 0.2, (0.4 -> 0.7), 1.1, 1.5, 1.9
    assert [t for _, t in got] == pytest.approx([0.0, 0.2, 0.7, 1.1, 1.5, 1.9], abs=1e-3)
    # indices from the PTS (time x the stream's mean rate), never a count of decoded frames
    assert [i for i, _ in got] == [round(t * rate) for _, t in got] and rate != 5
    # read as clips (each from the keyframe before it), the same frames, indices and times
    with VideoReader(str(path)) as r:
        clipped = [(f.index, f.timestamp_s) for f in r.frames(fps=5, clip=ClipRange(0.0, 0.6, 0.0))]
    with VideoReader(str(path)) as r:
        clipped += [(f.index, f.timestamp_s) for f in r.frames(fps=5, clip=ClipRange(0.6, None, 0.0))]
    assert clipped == got


def test_a_video_read_clip_by_clip_gives_the_frames_of_one_read_whole(tmp_path):
    # Guards against: clips sampled from their own start (frames doubled or lost at a boundary),
    # indices counted from a seek, a seek that lands after the clip's start.
    rng = np.random.default_rng(0)
    frames = [np.clip(np.full((64, 96, 3), (i * 7) % 255, np.int16) + rng.integers(0, 20, (64, 96, 3)), 0, 255)
              .astype(np.uint8) for i in range(150)]
    write_video(str(tmp_path / "long.mp4"), iter(frames), 25, keyframe_every=30)  # 6 s, a keyframe every 1.2 s
    with VideoReader(str(tmp_path / "long.mp4")) as r:
        whole = list(r.frames(fps=5))
        whole_s = r.decoded_s
    duration, origin = probe_video(str(tmp_path / "long.mp4"), longer_than=1.0)
    assert duration == pytest.approx(6.0, abs=0.05) and probe_video(str(tmp_path / "long.mp4"), longer_than=7) is None
    clipped, befores = [], []
    for k in range(5):  # 1.4 s clips: boundaries between keyframes and between sampling slots' frames
        with VideoReader(str(tmp_path / "long.mp4")) as r:
            clipped += list(r.frames(fps=5, clip=ClipRange(k * 1.4, (k + 1) * 1.4 if k < 4 else None, origin)))
            befores.append(r.before)
            last_s = r.decoded_s
    assert [(f.index, f.timestamp_s) for f in clipped] == [(f.index, f.timestamp_s) for f in whole]
    assert len(whole) == 30 and all(np.array_equal(a.image, b.image) for a, b in zip(clipped, whole))
    assert last_s == whole_s
    # each clip after the first saw the frame sampled last before it (a cut at its start is found)
    by_time = {f.timestamp_s: f.image for f in whole}
    for k in range(1, 5):
        previous = max(t for t in by_time if t < k * 1.4 - 1e-6)
        assert np.array_equal(befores[k], by_time[previous])


def test_reader_info_and_audio(tmp_path):
    path = face_video(tmp_path / "v.mp4", seconds=2.0, fps=10, w=320, h=240)
    with VideoReader(str(path)) as r:
        assert r.has_audio
        frames = list(r.frames(fps=5))
        # what was decoded, not what the header says: 20 frames of 0.1 s
        assert r.n_decoded == 20 and r.decoded_s == pytest.approx(2.0, abs=1e-6)
    assert len(frames) == 10 and frames[0].image.shape == (240, 320, 3) and frames[0].image.dtype == np.uint8
    audio = read_audio(str(path))
    assert audio.dtype == np.float32 and abs(audio.size - 32000) < 2048
    # 220 Hz tone: the spectrum peaks there
    spectrum = np.abs(np.fft.rfft(audio[2000:18000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 220) < 3


def test_missing_streams_raise_status(tmp_path):
    with pytest.raises(MediaError) as e:
        VideoReader(str(audio_only(tmp_path / "a.m4a")))
    assert e.value.status == "no_video" and "audio only" in str(e.value)
    with pytest.raises(MediaError) as e:
        read_audio(str(face_video(tmp_path / "s.mp4", audio=False)))
    assert e.value.status == "no_audio"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "RGB"])
def test_load_image_normalises_modes(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    else:
        img = img.convert(mode)
    img.save(tmp_path / "x.png")
    out = load_image(str(tmp_path / "x.png"))
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert np.array_equal(out[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
    if mode == "RGB":
        assert np.array_equal(out, rgb)  # channel order kept (a colour image: grey could not tell)


def test_list_inputs_folder_glob_manifest(tmp_path):
    for name in ("a.mp4", "b.MOV", "c.png", "notes.txt", ".hidden.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.mkv").write_bytes(b"x")
    names = lambda items: sorted(i.source.rsplit("/", 1)[-1] for i in items)  # noqa: E731
    assert names(list_inputs(str(tmp_path))) == ["a.mp4", "b.MOV", "c.png", "d.mkv"]
    assert names(list_inputs(str(tmp_path / "*.mp4"))) == ["a.mp4"]
    assert names(list_inputs(str(tmp_path / "*"))) == ["a.mp4", "b.MOV", "c.png"]  # `*` stays in its folder
    assert names(list_inputs(str(tmp_path / "**" / "*.mkv"))) == ["d.mkv"]
    (tmp_path / "m.txt").write_text("a.mp4\n# comment\nsub/d.mkv\n")
    assert names(list_inputs(str(tmp_path / "m.txt"))) == ["a.mp4", "d.mkv"]
    (tmp_path / "m.csv").write_text("source,label\na.mp4,1\nc.png,2\n")
    assert names(list_inputs(str(tmp_path / "m.csv"))) == ["a.mp4", "c.png"]
    kinds = {i.source.rsplit("/", 1)[-1]: i.kind for i in list_inputs(str(tmp_path))}
    assert kinds["c.png"] == "image" and kinds["a.mp4"] == "video"
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "nope"))


def test_a_local_folder_lists_the_inputs_fsspec_finds_with_their_ids(tmp_path):
    # The local walk that replaced fsspec's find (bench (g)'s memory) lists the same inputs, so the
    # ids a rerun matches against the output stay the same: nested, hidden and linked entries alike.
    import fsspec

    from aver.io.media import items_in_listing

    for rel in ("a.mp4", "sub/b.png", "sub/deep/c.wav", ".hidden/d.mp4", "sub/.e.mp4", "other/f.mkv"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "linked.mp4").symlink_to(tmp_path / "a.mp4")  # a linked file is an input
    (tmp_path / "folder.mp4").symlink_to(tmp_path / "other", target_is_directory=True)  # listed, not entered
    found = [(i.source, i.item_id, i.kind) for i in list_inputs(str(tmp_path))]
    fsspec_found = [(i.source, i.item_id, i.kind)
                    for i in items_in_listing(str(tmp_path), fsspec.filesystem("file").find(str(tmp_path)))]
    assert found == fsspec_found
    assert sorted(s.rsplit("/", 1)[-1] for s, _, _ in found) == \
        ["a.mp4", "b.png", "c.wav", "d.mp4", "f.mkv", "folder.mp4", "linked.mp4"]


def test_a_glob_is_one_listing(tmp_path, monkeypatch):
    # Guards against: a call per match (fs.glob asks isdir of each; quadratic on s3fs's cache).
    from fsspec.implementations.local import LocalFileSystem

    for i in range(300):
        (tmp_path / f"v{i:03d}.mp4").write_bytes(b"x")
    calls, depth = [], [0]

    def counted(name, real):
        def call(self, *a, **k):  # counts the calls list_inputs makes, not those inside fsspec's own
            if not depth[0]:
                calls.append(name)
            depth[0] += 1
            try:
                return real(self, *a, **k)
            finally:
                depth[0] -= 1
        return call

    for name in ("find", "ls", "isdir", "isfile", "info", "exists", "glob"):
        monkeypatch.setattr(LocalFileSystem, name, counted(name, getattr(LocalFileSystem, name)))
    assert len(list_inputs(str(tmp_path / "v*.mp4"))) == 300
    assert calls == ["find"]


def test_item_ids_are_stable_and_distinct():
    assert item_id_for("/data/x/clip 1.mp4") != item_id_for("/data/y/clip 1.mp4")
    assert item_id_for("/data/x/clip 1.mp4").startswith("clip_1-")


def test_item_and_unit_ids_agree_across_processes():
    # Guards against: ids from Python's salted hash() (or anything process-local): a rerun in a new
    # process would name every item and chunk anew, redo them all and duplicate their rows.
    import subprocess
    import sys

    from aver.pipelines.ledger import chunk_id

    code = ("from aver.io.media import item_id_for; from aver.pipelines.ledger import chunk_id; "
            "print(item_id_for('/data/x/clip 1.mp4'), item_id_for('s3://b/k/a.jpg'), chunk_id('images', ['b', 'a']))")
    here = f"{item_id_for('/data/x/clip 1.mp4')} {item_id_for('s3://b/k/a.jpg')} {chunk_id('images', ['a', 'b'])}"
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == here.split()


def test_write_video_round_trip(tmp_path):
    frames = [np.full((32, 48, 3), v, np.uint8) for v in (0, 128, 255)]
    write_video(str(tmp_path / "w.mp4"), iter(frames), 3)
    with VideoReader(str(tmp_path / "w.mp4")) as r:
        got = list(r.frames(fps=3))
    assert [round(float(f.image.mean())) for f in got] == pytest.approx([0, 128, 255], abs=4)


@pytest.mark.parametrize("archive", ["crops.zip", "crops.tar.gz"])
def test_archives_of_images(tmp_path, archive):
    import tarfile
    import zipfile

    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(buf, format="PNG")
    members = {"a/1.png": buf.getvalue(), "2.png": buf.getvalue(), "readme.md": b"x"}
    path = tmp_path / archive
    if archive.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    items = list_inputs(str(path))
    assert [i.kind for i in items] == ["image", "image"]
    assert all("::" in i.source and i.source.endswith(str(path)) for i in items)
    assert len({i.item_id for i in items}) == 2
    for i in items:
        assert load_image(i.source).shape == (30, 40, 3)


def test_manifest_entries_stay_in_their_folder(tmp_path):
    (tmp_path / "m").mkdir()
    for name in ("m/a.mp4", "outside.mp4", "elsewhere.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "m" / "list.txt").write_text(
        f"a.mp4\n../outside.mp4\nsub/../a.mp4\n{tmp_path / 'elsewhere.mp4'}\ns3://KEY:SECRET@b/x.mp4\n")
    items = {i.source.rsplit("/", 1)[-1]: i for i in list_inputs(str(tmp_path / "m" / "list.txt"))}
    assert sorted(items) == ["a.mp4", "elsewhere.mp4", "outside.mp4", "x.mp4"]  # sub/../a.mp4 is a.mp4
    assert items["a.mp4"].refusal is None
    assert "climbs out" in items["outside.mp4"].refusal
    assert items["elsewhere.mp4"].refusal is None  # a local manifest may name absolute paths
    assert items["x.mp4"].refusal and "SECRET" not in items["x.mp4"].source


def test_remote_manifest_names_only_its_own_store(tmp_path, s3):
    import fsspec

    fs = fsspec.filesystem("s3", **s3["options"])
    fs.pipe(f"{s3['bucket']}/man/list.txt",
            b"a.mp4\n/etc/passwd\nfile:///etc/hosts\ns3://other-bucket/b.mp4\nhttp://host/c.mp4\n")
    items = {i.source: i.refusal for i in list_inputs(f"s3://{s3['bucket']}/man/list.txt", s3["options"])}
    assert items[f"s3://{s3['bucket']}/man/a.mp4"] is None and items["s3://other-bucket/b.mp4"] is None
    for refused in ("/etc/passwd", "file:///etc/hosts", "http://host/c.mp4"):
        assert items[refused] and "may only name s3://" in items[refused]


def test_rotated_video_is_turned_upright(tmp_path):
    from tests.media_fixtures import _sideways_video

    upright = _sideways_video(tmp_path / "phone.mp4")
    with VideoReader(str(tmp_path / "phone.mp4")) as r:
        frames = list(r.frames(fps=10))
    assert frames[0].image.shape == upright[0].shape == (320, 240, 3)
    assert np.abs(frames[0].image.astype(int) - upright[0]).mean() < 15  # codec noise only
    assert np.abs(np.rot90(frames[0].image, 1).astype(int) - np.rot90(upright[0], 1)).mean() < 15


def test_duration_and_size_come_from_what_decodes(tmp_path):
    from tests.media_fixtures import _lying_mkv, _unknown_codec_avi

    _lying_mkv(tmp_path / "long.mkv", real_s=1.0, claimed_s=36000.0)
    with VideoReader(str(tmp_path / "long.mkv")) as r:
        assert len(list(r.frames(fps=5))) == 5 and r.decoded_s == pytest.approx(1.0)
    with VideoReader(str(tmp_path / "long.mkv"), max_duration_s=0.5) as r, pytest.raises(MediaError) as e:
        list(r.frames(fps=5))
    assert e.value.status == "too_large" and "decoded timestamps" in str(e.value)
    with pytest.raises(MediaError) as e:
        read_audio(str(tmp_path / "long.mkv"), max_duration_s=0.5)
    assert e.value.status == "too_large"
    write_video(str(tmp_path / "tiny.mp4"), (np.zeros((16, 16, 3), np.uint8) for _ in range(3)), 5)
    with VideoReader(str(tmp_path / "tiny.mp4")) as r, pytest.raises(MediaError) as e:
        list(r.frames(fps=5))
    assert e.value.status == "unsupported" and "16x16" in str(e.value)
    _unknown_codec_avi(tmp_path / "x.avi")
    with pytest.raises(MediaError) as e:
        VideoReader(str(tmp_path / "x.avi"))
    assert e.value.status == "unsupported" and "no decoder" in str(e.value)


def test_storage_faults_while_decoding_are_not_verdicts(tmp_path, monkeypatch):
    import errno as _errno

    path = face_video(tmp_path / "v.mp4", seconds=1.0)
    data = open(path, "rb").read()

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > len(data) // 2:
                raise OSError(_errno.EBUSY, "Service Unavailable")
            return super().read(n)

    monkeypatch.setattr("aver.io.media._open", lambda source, so: (Flaky(data), len(data)))
    with pytest.raises(OSError) as e:
        with VideoReader(str(path)) as r:
            list(r.frames(fps=5))
    assert not isinstance(e.value, MediaError) and e.value.errno == _errno.EBUSY


@pytest.mark.parametrize("job", ["extract", "score"])
def test_a_load_task_decodes_with_the_threads_it_reserved(tmp_path, monkeypatch, job):
    # Guards against: FFmpeg's own choice, a thread per core of the machine, in every load task
    # (sixteen 1-CPU tasks on a 16-core node ran 256 decoding threads), and a job's load stage
    # that does not pass its CPUs on.
    import aver.io.media as media
    from aver.io.media import decode_threads
    from aver.pipelines import extract, score
    from aver.pipelines.ledger import plan

    assert [decode_threads(c) for c in (0.25, 0.5, 1, 2.5, 4)] == [1, 1, 1, 2, 4]
    face_video(tmp_path / "in" / "v.mp4", seconds=1.0, audio=False)
    seen = []
    frames = media.VideoReader.frames

    def watched(self, fps, clip=None):
        for frame in frames(self, fps, clip):
            seen.append(self._container.streams.video[0].codec_context.thread_count)
            yield frame

    monkeypatch.setattr(media.VideoReader, "frames", watched)
    module, config = (extract, extract.ExtractFacesConfig) if job == "extract" else (score, score.ScoreVideosConfig)
    for cpus in (0.5, 3.0):
        more = {"model": str(tmp_path / "models")} if job == "score" else {}  # the load reads no model
        cfg = config(input=str(tmp_path / "in"), output=str(tmp_path / f"out{cpus}"), cpus_per_task=cpus, **more)
        items = media.list_inputs(cfg.input)
        unit = plan(cfg.output, {}, singles=[(i.item_id, vars(i)) for i in items]).units[0]
        seen.clear()
        records = list(module.load_unit(unit, cfg))
        assert records and seen and set(seen) == {decode_threads(cpus)}, (cpus, seen)
