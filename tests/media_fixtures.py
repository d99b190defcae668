"""Small media built on the fly: videos with a real face (scikit-image's astronaut photo, which
MTCNN detects), faceless videos, and a py-feat-style set of broken and odd inputs."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from aver.demo.media import write_video


def corpus_subset(corpus, dst, affectnet_rows: int, fec_triplets: int) -> dict[str, str]:
    """The first rows of the small corpus's AffectNet training manifest and FEC training triplets,
    with their images where the readers look: the face-training tests' data at a fraction of the forwards."""
    def head(src, out, lines):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(src) as f, open(out, "w") as g:
            g.writelines(f.readlines()[:lines])
        return str(out)

    os.makedirs(os.path.join(dst, "fec"), exist_ok=True)
    if not os.path.exists(os.path.join(dst, "fec", "images")):
        os.symlink(os.path.join(corpus, "fec", "images"), os.path.join(dst, "fec", "images"))
    return {"affectnet": head(os.path.join(corpus, "affectnet", "training.csv"),
                              os.path.join(dst, "affectnet", "training.csv"), 1 + affectnet_rows),
            "affectnet_images": os.path.join(corpus, "affectnet", "Manually_Annotated_Images"),
            "fec": head(os.path.join(corpus, "fec", "faceexp-comparison-data-train-public.csv"),
                        os.path.join(dst, "fec", "faceexp-comparison-data-train-public.csv"), fec_triplets)}


def face_images(folder, n, start=0):
    """``n`` JPEGs ``face<i>.jpg`` of the face patch with noise (seeded by ``start``)."""
    os.makedirs(folder, exist_ok=True)
    patch = face_patch(120)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        img = np.clip(patch.astype(int) + rng.integers(-15, 15, patch.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"face{i:03d}.jpg"))


def face_patch(height: int = 120) -> np.ndarray:
    from skimage import data

    face = data.astronaut()[30:210, 140:310]  # head and shoulders of a real photo
    w = int(round(face.shape[1] * height / face.shape[0]))
    return np.asarray(Image.fromarray(face).resize((w, height), Image.BILINEAR))


def _frames(n: int, w: int, h: int, face_at=lambda i: True, face_height: int = 120, seed: int = 0):
    patch = face_patch(face_height)
    rng = np.random.default_rng(seed)
    background = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    for i in range(n):
        img = background.copy()
        if face_at(i):
            x = min(w - patch.shape[1], 10 + i)
            y = (h - patch.shape[0]) // 2
            img[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
        yield img


def tone(seconds: float, sr: int = 16000, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def face_video(path, seconds=2.0, fps=10, w=320, h=240, audio=True, face_at=lambda i: True):
    n = int(seconds * fps)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    write_video(str(path), _frames(n, w, h, face_at), fps, audio=tone(seconds) if audio else None)
    return path


def audio_only(path, seconds=1.0):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=16000)
        s.layout = "mono"
        x = tone(seconds).reshape(1, -1)
        for start in range(0, x.shape[1], 1024):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, start:start + 1024]), format="fltp", layout="mono")
            fr.sample_rate = 16000
            fr.pts = start
            for p in s.encode(fr):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def bad_input_corpus(root) -> dict[str, str]:
    """Writes the set under ``root``; returns file name -> expected status."""
    os.makedirs(root, exist_ok=True)
    j = lambda name: os.path.join(root, name)  # noqa: E731
    expected = {}
    face_video(j("face.mp4")); expected["face.mp4"] = "ok"
    face_video(j("portrait.mp4"), w=240, h=320); expected["portrait.mp4"] = "ok"
    face_video(j("silent.mp4"), audio=False); expected["silent.mp4"] = "ok"
    face_video(j("noface.mp4"), face_at=lambda i: False); expected["noface.mp4"] = "no_face"
    face_video(j("face_then_none.mp4"), face_at=lambda i: i < 10); expected["face_then_none.mp4"] = "ok"
    face_video(j("none_then_face.mp4"), face_at=lambda i: i >= 10); expected["none_then_face.mp4"] = "ok"
    audio_only(j("speech_only.m4a")); expected["speech_only.m4a"] = "no_video"
    open(j("empty.mp4"), "wb").close(); expected["empty.mp4"] = "corrupt"
    with open(j("text.mp4"), "w") as f:
        f.write("this is not a video\n" * 20)
    expected["text.mp4"] = "corrupt"
    data = open(j("face.mp4"), "rb").read()
    with open(j("truncated.mp4"), "wb") as f:
        f.write(data[: len(data) // 3])
    expected["truncated.mp4"] = "corrupt"
    patch = face_patch(160)
    canvas = np.full((240, 240, 3), 100, np.uint8)
    canvas[40:200, 20:20 + patch.shape[1]] = patch[:, :200] if patch.shape[1] > 200 else patch
    Image.fromarray(canvas).convert("L").save(j("gray.png")); expected["gray.png"] = "ok"
    rgba = Image.fromarray(canvas).convert("RGBA")
    rgba.putalpha(255)
    rgba.save(j("rgba.png")); expected["rgba.png"] = "ok"
    gray16 = (np.asarray(Image.fromarray(canvas).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(j("gray16.png")); expected["gray16.png"] = "ok"
    Image.new("RGB", (12000, 9000), (90, 90, 90)).save(j("huge.png")); expected["huge.png"] = "too_large"
    Image.new("RGB", (8, 8), (90, 90, 90)).save(j("tiny.png")); expected["tiny.png"] = "unsupported"
    return expected


def _sideways_video(path, seconds=1.0, fps=10):
    """A portrait phone video: frames stored sideways, a display matrix that turns them upright."""
    import av

    upright = list(_frames(int(seconds * fps), 240, 320))
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.pix_fmt = "yuv420p"
        vs.height, vs.width = 240, 320
        vs.set_display_rotation(-90)  # players turn the stored frames 90 degrees clockwise
        for frame in upright:
            stored = np.ascontiguousarray(np.rot90(frame, 1))
            for p in vs.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    return upright


def _unknown_codec_avi(path):
    """An AVI whose video fourcc no decoder knows (PyAV gives it no codec context)."""
    import av

    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=5)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            for p in vs.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    data = open(path, "rb").read()
    assert data.count(b"FMP4") == 2
    with open(path, "wb") as f:
        f.write(data.replace(b"FMP4", b"QQ9Z"))


def _lying_mkv(path, real_s=1.0, claimed_s=36000.0):
    """A Matroska file of ``real_s`` seconds (a face, a tone) whose header declares ``claimed_s``."""
    import struct

    patch = face_patch(100)
    frames = []
    for _ in range(int(real_s * 5)):
        img = np.full((160, 160, 3), 90, np.uint8)
        img[30:130, 30:30 + patch.shape[1]] = patch
        frames.append(img)
    write_video(str(path), iter(frames), 5, audio=tone(real_s))
    data = bytearray(open(path, "rb").read())
    i = data.find(b"\x44\x89\x88")  # Segment Info > Duration, float64, in milliseconds
    assert i > 0
    data[i + 3:i + 11] = struct.pack(">d", claimed_s * 1000.0)
    with open(path, "wb") as f:
        f.write(bytes(data))


def hostile_corpus(root) -> tuple[str, dict[str, str], dict[str, str]]:
    """Every odd input of issue 11 and SPEC §6 in one folder, named by a manifest ``list.txt``;
    returns (manifest, expected extract_faces status, expected score_videos status) per entry."""
    root = str(root)
    expected = bad_input_corpus(root)
    j = lambda name: os.path.join(root, name)  # noqa: E731
    for side in (2, 16):
        write_video(j(f"tiny{side}.mp4"), (np.full((side, side, 3), 100, np.uint8) for _ in range(5)), 5,
                    audio=tone(1.0))
        expected[f"tiny{side}.mp4"] = "unsupported"
    _unknown_codec_avi(j("unknown.avi")); expected["unknown.avi"] = "unsupported"
    _lying_mkv(j("ten_hours.mkv")); expected["ten_hours.mkv"] = "ok"
    _sideways_video(j("phone.mp4")); expected["phone.mp4"] = "ok"
    patch = face_patch(40)
    strip = np.full((40, 2000, 3), 100, np.uint8)
    strip[:, 900:900 + patch.shape[1]] = patch
    Image.fromarray(strip).save(j("strip.png")); expected["strip.png"] = "ok"
    os.symlink(j("loop.mp4"), j("loop.mp4")); expected["loop.mp4"] = "corrupt"
    face_video(os.path.join(os.path.dirname(root.rstrip("/")), "outside.mp4"), seconds=1.0)
    entries = sorted(expected) + ["../outside.mp4", "s3://Bad_Bucket!/x.mp4", j("face.mp4")]
    expected["../outside.mp4"] = expected["s3://Bad_Bucket!/x.mp4"] = "unsupported"
    with open(j("list.txt"), "w") as f:
        f.write("# every odd input\n" + "\n".join(entries) + "\n")
    score = {k: v for k, v in expected.items() if not k.endswith(".png")}
    score.update({"silent.mp4": "no_audio", "phone.mp4": "no_audio", "speech_only.m4a": "ok"})
    return j("list.txt"), expected, score
