#!/usr/bin/env python
"""`make bench`: speed and memory ratios of the face pipeline, measured in one run on this machine.

(a) extract_faces frames/s over a naive per-frame facenet-pytorch loop on the same 720p videos;
(b) distill crops/s over the bare two-teacher forward pass in one process on the same crops;
(c) peak memory (driver + local Ray workers: PSS, and the RSS sum) of extract_faces on a corpus 4x as large as another;
(d) score_videos: seconds of video scored per second of wall time (face + speech, 720p);
(e) peak memory of score_videos on an archive 4x as large as another;
(f) distill reading crops from a local S3 behind a proxy adding 20 ms to every request, over the
    bare teacher pair on the same crops in memory (I/O hidden behind the models);
(g) planning an input of 100k files against 25k: seconds and driver peak RSS;
(h) peak memory of a student's training worker with 200k distillation targets against 50k, and its
    anonymous memory with a frozen-prefix shard 4x as large;
(j) peak memory of score_videos (largest process, and the tree) on one video 8x as long as another;
(k) bytes the driver receives per input, score_videos on videos 4x as long; the driver's peak RSS;
(l) images/s the student's datasets deliver to a no-op consumer, images on a local S3 behind the
    20 ms proxy against on local disk;
(m) unlabeled crops/s delivered from faces parts against one S3 object per crop, behind that proxy;
(n) one long 720p video through extract_faces' load stage (a model stage that does nothing: decode-bound),
    read as clips against read whole by one task.
Writes the figures to --report (default docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(folder: str, n: int, seconds: float = 4.0, w: int = 1280, h: int = 720) -> None:
    from PIL import Image
    from skimage import data

    from aver.demo.media import write_video

    os.makedirs(folder, exist_ok=True)
    k = h / 720  # the 720p layout, scaled
    fw, fh, top, left, span = (round(k * d) for d in (300, 320, 200, 100, 400))
    face = data.astronaut()[30:210, 140:310]
    face = np.asarray(Image.fromarray(face).resize((fw, fh)))
    rng = np.random.default_rng(0)
    for v in range(n):
        bg = rng.integers(40, 160, (h, w, 3), dtype=np.uint8)

        def frames():
            for i in range(int(seconds * 10)):
                img = bg.copy()
                x = left + round(k * (10 * i + 50 * v)) % (w - span)
                img[top:top + fh, x:x + fw] = face
                yield img

        write_video(os.path.join(folder, f"v{v}.mp4"), frames(), 10)


def _talking_corpus(folder: str, n: int, seconds: float, w: int = 1280, h: int = 720) -> None:
    """Videos (720p by default) with a moving face and a synthetic voice (what score_videos is for)."""
    from aver.demo.media import write_video
    from aver.demo.corpus import smooth_trajectory, voice

    _corpus(folder, n, seconds=seconds, w=w, h=h)
    rng = np.random.default_rng(1)
    for v in range(n):
        path = os.path.join(folder, f"v{v}.mp4")
        import av

        with av.open(path) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        steps = int(seconds / 0.04)
        audio = voice(smooth_trajectory(steps, rng), smooth_trajectory(steps, rng), rng)
        write_video(path, iter(frames), 10, audio=audio)


def _random_models(folder: str) -> None:
    """Untrained checkpoints: throughput does not depend on the weights' values."""
    import torch

    from aver.models import FusionModel, Student, VGGishEmotion, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(Student().eval(), os.path.join(folder, "student.pt"))
    for dim in ("arousal", "valence"):
        save_checkpoint(VGGishEmotion().eval(), os.path.join(folder, f"vggish_{dim}.pt"))
    save_checkpoint(FusionModel(1920, 256).eval(), os.path.join(folder, "fusion.pt"))


def naive_extract(folder: str, fps: float = 5.0, videos: int | None = None) -> int:
    """What a facenet-pytorch script does: every frame, one MTCNN call per sampled frame (over the
    first ``videos`` of the folder, or all); returns the frames sampled."""
    import av
    from facenet_pytorch import MTCNN
    from PIL import Image

    mtcnn = MTCNN(image_size=140, keep_all=False)
    n = 0
    for name in sorted(os.listdir(folder))[:videos]:
        with av.open(os.path.join(folder, name)) as c:
            stream = c.streams.video[0]
            step = max(1, round(float(stream.average_rate) / fps))
            for i, frame in enumerate(c.decode(stream)):
                if i % step:
                    continue
                img = Image.fromarray(frame.to_ndarray(format="rgb24"))
                boxes, _ = mtcnn.detect(img)
                if boxes is not None:
                    img.crop(tuple(int(v) for v in boxes[0])).resize((140, 140)).save(io.BytesIO(), "JPEG")
                n += 1
    return n


class Peaks(NamedTuple):
    """Peaks (MiB) of a job's process tree, sampled every 0.1 s."""

    pss: float
    """Sum of PSS: each shared page split between the processes that map it (what the job really holds)."""
    rss: float
    """Sum of RSS: shared pages (libtorch, the object store) counted once per process that maps them."""
    uss: float
    """Sum of USS: private pages only (what the processes hold of their own)."""
    largest: float
    """RSS of the largest single process."""
    driver: float
    """RSS of the job's own process (the driver)."""
    anon: float
    """Sum of RssAnon: anonymous pages resident (heaps; not mapped files, not shared memory)."""


def _rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def peak_memory_of_job(args: list[str], only: str = "") -> Peaks:
    """:class:`Peaks` of the job's process tree (driver and the local Ray it starts; ``only``: the
    processes whose command line holds it)."""
    import psutil

    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = [0] * 6
    while proc.poll() is None:
        now = [0] * 6
        for p in [root, *root.children(recursive=True)]:
            try:
                if only and only not in " ".join(p.cmdline()):
                    continue
                info = p.memory_full_info()
                anon = _rss_anon(p.pid)
            except (psutil.Error, OSError, StopIteration):  # a process that ended between the listing and the read
                continue
            now[:3] = now[0] + info.pss, now[1] + info.rss, now[2] + info.uss
            now[3] = max(now[3], info.rss)
            if p.pid == root.pid:
                now[4] = info.rss
            now[5] += anon
        peak = [max(a, b) for a, b in zip(peak, now)]
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"job failed: {args}")
    return Peaks(*(v / 2**20 for v in peak))


def extract_speed(work: str, corpus: str, n_videos: int, cpus: float) -> str:
    """(a) extract_faces against a naive per-frame facenet-pytorch loop, frames per second."""
    from aver.pipelines.extract import ExtractFacesConfig
    from aver.pipelines.extract import run as run_extract

    from aver.io.parts import read_folder

    # A per-frame loop has no start-up to amortise: its rate over a third of the videos is its rate
    # over all of them (and saves the bench ~3 minutes).
    sample = max(1, n_videos // 3)
    t = time.perf_counter()
    n_naive = naive_extract(corpus, videos=sample)
    naive = n_naive / (time.perf_counter() - t)
    t = time.perf_counter()
    # Every CPU, as the one-process baseline gets, as one single-thread detector actor per CPU.
    run_extract(ExtractFacesConfig(input=corpus, output=os.path.join(work, "faces"), **_actor_per_cpu(cpus)))
    seconds = time.perf_counter() - t
    frames = read_folder(os.path.join(work, "faces", "faces"), columns=["crop_id"]).num_rows  # a row per frame
    ours = frames / seconds
    return (f"## (a) extract_faces vs naive per-frame MTCNN\n\n{n_videos} videos, 1280x720, 8 s, "
            f"{frames} sampled frames at 5 fps (the naive loop timed on {sample} of them, {n_naive} frames).\n\n"
            f"| | frames/s |\n|---|---|\n"
            f"| naive facenet-pytorch loop | {naive:.1f} |\n"
            f"| extract_faces ({int(cpus)} single-thread actors, all CPUs, Ray Data) | {ours:.1f} |\n\n"
            f"**Ratio {ours / naive:.2f}x** (target >= 2x).\n")


def _one_actor(cpus: float) -> dict:
    """One model actor with every CPU but half of one, left to the load and write tasks (their work
    is small beside the models'; torch in the actor still gets every CPU's thread)."""
    return {"actors": 1, "cpus_per_actor": cpus - 0.5, "cpus_per_task": 0.5}


def _actor_per_cpu(cpus: float) -> dict:
    """One detector actor per CPU (one torch thread each) and half a CPU for the load and write
    tasks: MTCNN's small convolutions gain little from a second thread (40 frames at 640 px: 1.2 s
    on two threads, 1.7 s on one), so two one-thread actors detect more frames than one two-thread one."""
    n = max(1, int(cpus))
    return {"actors": n, "cpus_per_actor": (cpus - 0.5) / n, "cpus_per_task": 0.5}


def _one_actor_flags(cpus: float) -> list[str]:
    return [arg for k, v in _one_actor(cpus).items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def _bench_crops(work: str, n_crops: int) -> list[bytes]:
    from aver.io.parts import read_folder

    crops = read_folder(os.path.join(work, "faces", "faces")).to_pandas()["crop"].dropna().tolist()
    return (crops * (n_crops // max(1, len(crops)) + 1))[:n_crops]


def _faces_part(crops: list[bytes], start: int = 0):
    """A faces/ part (extract_faces' schema) holding ``crops``."""
    import pyarrow as pa

    from aver.pipelines.extract import FACES_SCHEMA

    rows = [{"video_id": "b", "source": "b", "crop_id": f"b-{start + i:07d}", "frame_index": start + i,
             "timestamp_s": 0.0, "track_id": 0, "box": [0.0, 0.0, 1.0, 1.0], "prob": 1.0, "crop": c}
            for i, c in enumerate(crops)]
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def distill_efficiency(work: str, n_crops: int, cpus: float) -> tuple[str, float]:
    """(b) the distill job against a bare forward of both teachers, crops per second (needs (a)'s
    faces); returns the report and the bare rate, which (f) compares with too."""
    import torch
    from PIL import Image

    from aver.io.parts import write_table
    from aver.models import Teacher, save_checkpoint
    from aver.pipelines.distill import DistillConfig, teacher_targets
    from aver.pipelines.distill import run as run_distill

    crops = _bench_crops(work, n_crops)
    write_table(os.path.join(work, "crops", "faces", "b.parquet"), _faces_part(crops))
    teachers = [Teacher(d_face=128).eval(), Teacher(d_face=256).eval()]
    uris = [os.path.join(work, f"t{i}.pt") for i in range(2)]
    for m, u in zip(teachers, uris):
        save_checkpoint(m, u)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(crops), 64):
            imgs = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in crops[s:s + 64]]
            teacher_targets(*(m(Teacher.preprocess(imgs)) for m in teachers))
    bare = len(crops) / (time.perf_counter() - t)
    t = time.perf_counter()
    run_distill(DistillConfig(input=os.path.join(work, "crops"), teachers=tuple(uris),
                              output=os.path.join(work, "distill"), batch_size=64, **_one_actor(cpus)))
    pipe = len(crops) / (time.perf_counter() - t)
    return (f"## (b) distill vs bare teacher forward\n\n{len(crops)} crops, both teachers, fp32 on CPU.\n\n"
            f"| | crops/s |\n|---|---|\n| bare forward, one process | {bare:.1f} |\n"
            f"| distill job (1 actor, all CPUs) | {pipe:.1f} |\n\n**Ratio {pipe / bare:.2f}** (target >= 0.8).\n"), bare


def remote_distill_efficiency(work: str, n_crops: int, cpus: float, bare: float, latency_s: float = 0.02) -> str:
    """(f) distill over crops on a local S3 behind a proxy adding ``latency_s`` to every request,
    against (b)'s bare teacher pair (``bare`` crops/s) on the same crops (needs (b)'s teachers)."""
    import fsspec

    from aver.demo.s3proxy import S3Proxy, local_s3
    from aver.pipelines.distill import DistillConfig
    from aver.pipelines.distill import run as run_distill

    crops = _bench_crops(work, n_crops)
    uris = [os.path.join(work, f"t{i}.pt") for i in range(2)]
    per = 256
    with local_s3("bench") as store:
        proxy = S3Proxy(store["endpoint"], latency_s=latency_s)
        try:
            _packed_faces("bench/crops", crops, per, fs=fsspec.filesystem("s3", **store["options"]))
            t = time.perf_counter()
            # the teachers stay local files, as in (b): what is measured is hiding the crops' latency
            run_distill(DistillConfig(input="s3://bench/crops/", teachers=tuple(uris), output="s3://bench/out/",
                                      storage_options=proxy.options(store["options"]), batch_size=64,
                                      images_per_unit=per, **_one_actor(cpus)))
            rate, requests = len(crops) / (time.perf_counter() - t), proxy.requests
        finally:
            proxy.close()
    return (f"## (f) distill from S3 with {latency_s * 1000:.0f} ms per request vs bare teacher forward\n\n"
            f"{len(crops)} crops on a local S3 (moto) behind a proxy adding {latency_s * 1000:.0f} ms to every "
            f"request, as extract_faces writes them (faces parts of {per} crops; {requests} requests in all, "
            f"outputs included); both teachers (local files, as in (b)), fp32 on CPU; against (b)'s bare forward "
            f"of the same crops. (m) compares the faces parts with one S3 object per crop.\n\n"
            f"| | crops/s |\n|---|---|\n| bare forward, one process ((b)) | {bare:.1f} |\n"
            f"| distill job, faces parts on S3 | {rate:.1f} |\n\n**Ratio {rate / bare:.2f}** (target >= 0.8).\n")


_PLAN = """
import sys, time, tracemalloc
from aver.io.media import list_inputs
from aver.pipelines.extract import ExtractFacesConfig, plan_units
cfg = ExtractFacesConfig(input=sys.argv[1], output=sys.argv[2])
if sys.argv[3:] == ["traced"]:  # a run of its own: the tracer's records cost time and memory as well
    tracemalloc.start()
start = time.perf_counter()
work = plan_units(list_inputs(cfg.input), cfg)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would carry the forking bench's peak across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(len(work.units), seconds, hwm / 1024, tracemalloc.get_traced_memory()[1])
"""


def planning_scale(work: str, small: int = 25_000, large: int = 100_000) -> str:
    """(g) planning (one listing, unit formation against an empty output) of 100k files against 25k."""
    figures = {}
    for n in (small, large):
        folder = os.path.join(work, f"plan{n}")
        for i in range(n):  # 100 files a folder, as an image archive might be laid out
            sub = os.path.join(folder, f"d{i // 100:04d}")
            if i % 100 == 0:
                os.makedirs(sub, exist_ok=True)
            open(os.path.join(sub, f"img{i:06d}.jpg"), "wb").close()
        def plan(how: str) -> tuple[int, float, float, int]:
            out = subprocess.run([sys.executable, "-c", _PLAN, folder, os.path.join(work, f"plan-out{n}"), how],
                                 cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
            return int(out[0]), float(out[1]), float(out[2]), int(out[3])

        runs = [plan("untraced") for _ in range(3)]  # the fastest of three: a single sub-second run moved +-30%
        figures[n] = (runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs), plan("traced")[3])
    (u1, t1, r1, _), (u4, t4, r4, traced) = figures[small], figures[large]
    per_item = traced / large
    return (f"## (g) planning {large // 1000}k vs {small // 1000}k inputs\n\n"
            f"extract_faces' driver: one recursive listing of a folder of images (100 per sub-folder), ids, "
            f"chunks of 256 against an empty output; a fresh process each (its peak RSS includes the "
            f"interpreter, torch and aver), the fastest and smallest of three.\n\n| files | units | seconds | driver peak RSS MiB |\n|---|---|---|---|\n"
            f"| {small} | {u1} | {t1:.2f} | {r1:.0f} |\n| {large} | {u4} | {t4:.2f} | {r4:.0f} |\n\n"
            f"**Time ratio {t4 / t1:.2f}** (target <= 4.5), **RSS ratio {r4 / r1:.2f}** (target <= 1.5); "
            f"planning allocates at most {per_item:.0f} bytes per file (Python's tracemalloc peak over the "
            f"listing and planning of {large} files, in a run of its own), small beside the process itself.\n")


def extract_memory(work: str, cpus: float) -> str:
    """(c) extract_faces peak RSS on a 4x larger corpus over a 1x one."""
    small, large = os.path.join(work, "rss1"), os.path.join(work, "rss4")
    _corpus(small, 2, seconds=4.0)
    _corpus(large, 8, seconds=4.0)
    job = ["jobs/extract_faces.py", *_one_actor_flags(cpus)]
    m1 = peak_memory_of_job(job + ["--input", small, "--output", os.path.join(work, "o1")])
    m4 = peak_memory_of_job(job + ["--input", large, "--output", os.path.join(work, "o4")])
    return ("## (c) extract_faces peak memory, 1x vs 4x corpus\n\nDriver plus local Ray processes, "
            "2 vs 8 videos (720p, 4 s).\n\n" + _memory_table("corpus", m1, m4))


def _memory_table(what: str, m1: tuple[float, ...], m4: tuple[float, ...]) -> str:
    return (f"| {what} | peak PSS MiB | peak RSS sum MiB |\n|---|---|---|\n| 1x | {m1[0]:.0f} | {m1[1]:.0f} |\n"
            f"| 4x | {m4[0]:.0f} | {m4[1]:.0f} |\n\n**Ratio {m4[0] / m1[0]:.2f}** of the PSS peaks (target <= 1.2); "
            f"{m4[1] / m1[1]:.2f} of the RSS sums.\n")


def _score_job(work: str, cpus: float) -> list[str]:
    models = os.path.join(work, "models")
    if not os.path.exists(models):
        _random_models(models)
    return ["jobs/score_videos.py", "--model", models, *_one_actor_flags(cpus)]


def score_speed(work: str, n_videos: int, cpus: float) -> str:
    """(d) score_videos wall-clock throughput, seconds of video per second."""
    talks = os.path.join(work, "talks")
    _talking_corpus(talks, n_videos, seconds=20.0)
    t = time.perf_counter()
    subprocess.run([sys.executable, *_score_job(work, cpus), "--input", talks, "--output", os.path.join(work, "scored")],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = n_videos * 20.0
    rate = seconds / (time.perf_counter() - t)
    return (f"## (d) score_videos throughput\n\n{n_videos} videos, 1280x720, 20 s, face and speech; "
            f"faces at 5 fps, fusion every 0.4 s; one actor with all CPUs; wall time of the whole job "
            f"(Ray start-up and model loading included).\n\n**{rate:.2f} s of video per second** "
            f"({seconds:.0f} s in {seconds / rate:.0f} s).\n")


def score_memory(work: str, cpus: float) -> str:
    """(e) score_videos peak RSS on a 4x larger archive over a 1x one."""
    s1, s4 = os.path.join(work, "talk1"), os.path.join(work, "talk4")
    _talking_corpus(s1, 2, seconds=8.0)
    _talking_corpus(s4, 8, seconds=8.0)
    job = _score_job(work, cpus)
    m1 = peak_memory_of_job(job + ["--input", s1, "--output", os.path.join(work, "so1")])
    m4 = peak_memory_of_job(job + ["--input", s4, "--output", os.path.join(work, "so4")])
    return ("## (e) score_videos peak memory, 1x vs 4x archive\n\nDriver plus local Ray processes, "
            "2 vs 8 videos (720p, 8 s, with audio).\n\n" + _memory_table("archive", m1, m4))


def long_video_memory(work: str, cpus: float, seconds: float = 15.0, times: int = 8) -> str:
    """(j) score_videos on one long talking-head video against one ``times`` shorter (low resolution):
    peak memory of the largest single process, and of the tree."""
    runs = {}
    for n in (1, times):
        folder = os.path.join(work, f"long{n}")
        _talking_corpus(folder, 1, seconds=n * seconds, w=320, h=240)
        runs[n] = peak_memory_of_job(_score_job(work, cpus) + ["--input", folder, "--output",
                                                               os.path.join(work, f"long{n}-out")])
    a, b = runs[1], runs[times]
    return (f"## (j) score_videos peak memory, one video {times}x as long\n\n"
            f"One talking-head video (320x240, face and speech) of {seconds:.0f} s vs {times * seconds:.0f} s; "
            f"the largest single process (RSS) and the whole tree (PSS sum).\n\n"
            f"| video | largest process MiB | tree PSS MiB |\n|---|---|---|\n"
            f"| {seconds:.0f} s | {a.largest:.0f} | {a.pss:.0f} |\n| {times * seconds:.0f} s | {b.largest:.0f} | "
            f"{b.pss:.0f} |\n\n**Ratio {b.largest / a.largest:.2f}** of the largest process (target <= 1.2); "
            f"{b.pss / a.pss:.2f} of the tree.\n")


def driver_bytes(work: str, cpus: float, seconds: float = 5.0, n_videos: int = 2) -> str:
    """(k) bytes the driver receives per input, score_videos on videos 4x as long; its peak RSS."""
    runs = {}
    for n in (1, 4):
        folder, count = os.path.join(work, f"drv{n}"), os.path.join(work, f"drv{n}.bytes")
        _talking_corpus(folder, n_videos, seconds=n * seconds, w=320, h=240)
        job = _score_job(work, cpus) + ["--input", folder, "--output", os.path.join(work, f"drv{n}-out")]
        peaks = peak_memory_of_job(["jobs/bench.py", "--count-driver-bytes", count, "--", *job])
        runs[n] = (int(open(count).read()) / n_videos, peaks.driver)
    (b1, r1), (b4, r4) = runs[1], runs[4]
    return (f"## (k) bytes the driver receives per input, videos 4x as long\n\n"
            f"score_videos on {n_videos} talking-head videos (320x240) of {seconds:.0f} s vs {4 * seconds:.0f} s; "
            f"the pickled size of every batch the driver's iterator hands aver and every `ray.get` aver calls "
            f"there; the driver's peak RSS.\n\n| videos | bytes per input | driver peak RSS MiB |\n|---|---|---|\n"
            f"| {seconds:.0f} s | {b1:.0f} | {r1:.0f} |\n| {4 * seconds:.0f} s | {b4:.0f} | {r4:.0f} |\n\n"
            f"**Ratio {b4 / b1:.2f}** of the bytes per input (target <= 1.1).\n")


LOOP_S = 16.0
"""Period of :func:`_long_720p`'s motion at 25 fps (the background's 40 frames, the face's 200)."""


def _long_720p(path: str, seconds: float, fps: int = 25, keyframe_s: float = 2.0) -> None:
    """A 720p recording at 25 fps, a keyframe every 2 s (as broadcast and phone video): a face
    moving over a textured background that drifts (every frame costs the decoder work)."""
    from PIL import Image
    from skimage import data

    from aver.demo.media import write_video

    face = np.asarray(Image.fromarray(data.astronaut()[30:210, 140:310]).resize((300, 320)))
    bg = np.random.default_rng(0).integers(40, 160, (720, 1400, 3), dtype=np.uint8)

    def frames():
        for i in range(int(seconds * fps)):
            img = np.ascontiguousarray(bg[:, (3 * i) % 120:(3 * i) % 120 + 1280])
            x = 100 + (4 * i) % 800
            img[200:520, x:x + 300] = face
            yield img

    write_video(path, frames(), fps, keyframe_every=int(keyframe_s * fps))


def _repeat_video(src: str, dst: str, times: int) -> None:
    """``src`` played ``times`` times over as one recording, by copying its packets with their
    timestamps moved on (no encoding: seconds for what would take minutes to encode)."""
    import av

    with av.open(src) as inp, av.open(dst, mode="w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        packets = [(p, p.pts, p.dts) for p in inp.demux(vin) if p.size]
        span = max(p.pts + p.duration for p, _, _ in packets) - min(pts for _, pts, _ in packets)
        for k in range(times):
            for p, pts, dts in packets:
                p.pts, p.dts, p.stream = pts + k * span, dts + k * span, vout
                out.mux(p)


def _no_model():
    """(n)'s model stage: drops the frames as a model stage does, and runs nothing."""
    from aver.pipelines.stages import ModelStage

    class NoModel(ModelStage):
        consumed = ("frames",)

        def __init__(self, cfg) -> None:
            pass

        def run(self, records) -> None:
            pass

    return NoModel


def _count_frames(unit, records, cfg) -> list[dict]:
    """(n)'s commit: reads every record back (as a real commit does) and writes nothing."""
    from aver.pipelines.ledger import status_row

    n = sum(1 for _ in records())  # records, read back as a commit reads them
    return [status_row("video_id", unit.unit_id, None, n_frames=n)]


def clip_speed(work: str, cpus: float, seconds: float = 480.0, clip_s: float = 60.0) -> str:
    """(n) one long 720p video through extract_faces' load stage with a model stage that does
    nothing, read as clips of ``clip_s`` vs read whole by one task: wall time of each run. Long (eight
    minutes) because a run's fixed cost (the model actor's start, Ray Data's planning: ~3 s, which the
    whole read hides on its idle core) does not grow with the input, as (a)'s corpus amortises start-up."""
    from aver.io.media import list_inputs
    from aver.pipelines.extract import ExtractFacesConfig, load_unit, plan_units
    from aver.pipelines.stages import plan_long_inputs, run_stages

    import ray.cloudpickle

    if __name__ != "__main__":  # imported (tests): the workers cannot import jobs/ by name
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    folder = os.path.join(work, "long720")
    os.makedirs(folder, exist_ok=True)
    piece = os.path.join(work, "long720-piece.mp4")
    _long_720p(piece, LOOP_S)  # encoded once, played over: its motion repeats every LOOP_S
    _repeat_video(piece, os.path.join(folder, "rec.mp4"), round(seconds / LOOP_S))
    took = {}
    for name, clip in (("whole", 0.0), ("clips", clip_s)):
        cfg = ExtractFacesConfig(input=folder, output=os.path.join(work, f"long720-{name}"), clip_s=clip,
                                 cpus_per_task=0.5, cpus_per_actor=0.1, actors=1)
        t = time.perf_counter()
        units, finalize = plan_long_inputs(plan_units(list_inputs(folder), cfg).units, cfg, clip_s=clip,
                                           fps=cfg.fps, max_duration_s=cfg.max_duration_s, audio=False)
        frames = [s.counts for s in run_stages(units, cfg, load=load_unit, model=_no_model(), commit=_count_frames,
                                               id_column="video_id", finalize=finalize,
                                               records_per_call=cfg.records_per_call)]  # as extract_faces calls it
        took[name] = (time.perf_counter() - t, len(units), frames)
    (whole, _, _), (clipped, n_clips, _) = took["whole"], took["clips"]
    return (f"## (n) one long video read as clips\n\nOne 1280x720 recording of {seconds:.0f} s at 25 fps "
            f"(a keyframe every 2 s) through extract_faces' load stage at 5 fps (decode, downscale, detection "
            f"view, cut histogram) with a model stage that does nothing (a {LOOP_S:.0f}-s piece played over, its "
            f"packets copied: decoding costs what a recording's does); read whole by one task, or as "
            f"{n_clips} clips of {clip_s:.0f} s on {int(cpus)} CPUs (load tasks of half a CPU, each decoding with one "
            f"FFmpeg thread: two 1-CPU load tasks and the model actor's share do not fit on 2 CPUs); segments of "
            f"{cfg.detector.batch_size} frames, {cfg.records_per_call} to a model call, as extract_faces sends them.\n\n"
            f"| | wall s |\n|---|---|\n| one unit | {whole:.1f} |\n| {n_clips} clips | {clipped:.1f} |\n\n"
            f"**Ratio {clipped / whole:.2f}** of the wall time (target <= 0.65).\n")


def _count_driver_bytes_of(count_file: str, job: list[str]) -> int:
    """Run ``job`` (``jobs/X.py args``) in this process, counting what its driver receives."""
    import runpy

    sys.path.insert(0, ROOT)
    from tests.ray_helpers import count_driver_bytes

    got = count_driver_bytes()
    sys.argv = job
    try:
        runpy.run_path(os.path.join(ROOT, job[0]), run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    with open(count_file, "w") as f:
        f.write(str(sum(got)))
    return 0


def _student_corpus(work: str) -> dict[str, str]:
    """The demo's small corpus with its FEC images fetched (written once per bench run)."""
    from aver.demo.corpus import write_corpus
    from aver.pipelines.fetch import FetchConfig
    from aver.pipelines.fetch import run as fetch

    corpus = os.path.join(work, "student-corpus")
    fec = os.path.join(corpus, "fec", "faceexp-comparison-data-train-public.csv")
    if not os.path.exists(fec):
        write_corpus(corpus, seed=5, size="small")
        fetch(FetchConfig(manifest=fec, output=os.path.join(corpus, "fec"), allow_file_urls=True))
    return {"affectnet": os.path.join(corpus, "affectnet", "training.csv"), "fec": fec,
            "affectnet_images": os.path.join(corpus, "affectnet", "Manually_Annotated_Images"),
            "fec_images": os.path.join(corpus, "fec", "images"), "unlabeled": os.path.join(corpus, "unlabeled")}


def _packed_faces(folder: str, crops: list[bytes], per: int = 256, fs=None) -> None:
    """``crops`` as extract_faces' faces parts of ``per`` crops under ``folder``/faces/ (on ``fs``)."""
    import pyarrow.parquet as pq

    for p in range(0, len(crops), per):
        buf = io.BytesIO()
        pq.write_table(_faces_part(crops[p:p + per], start=p), buf)
        path = f"{folder}/faces/part{p // per:04d}.parquet"
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(buf.getvalue())
        else:
            fs.pipe(path, buf.getvalue())


def _both_layouts(fs, bucket: str, crops: list[bytes], per: int = 256) -> dict[str, str]:
    """``crops`` on S3 as extract_faces writes them (faces parts of ``per`` crops) and as one JPEG
    object each: {layout: URI}."""
    _packed_faces(f"{bucket}/faces", crops, per, fs=fs)
    for i, c in enumerate(crops):
        fs.pipe(f"{bucket}/crops/c{i:05d}.jpg", c)
    return {"faces parts": f"s3://{bucket}/faces/", "one object per crop": f"s3://{bucket}/crops/"}


def _targets_part(path: str, crop_ids: list[str], rng) -> None:
    """A distill targets part of random targets for ``crop_ids``."""
    import pyarrow as pa

    from aver.io.parts import write_table
    from aver.pipelines.distill import TARGETS_SCHEMA

    values = rng.standard_normal((len(crop_ids), 80)).astype(np.float32)
    write_table(path, pa.table({"crop_id": crop_ids, "target": pa.FixedSizeListArray.from_arrays(
        pa.array(values.ravel()), 80)}, schema=TARGETS_SCHEMA))


def _student_job(data: dict, output: str, *flags: str) -> list[str]:
    return ["jobs/train_student.py", "--affectnet", data["affectnet"], "--fec", data["fec"], "--affectnet-images",
            data["affectnet_images"], "--output", output, "--epochs", "1", "--batch-size", "8", *flags]


def student_memory(work: str, small: int = 50_000, large: int = 200_000) -> str:
    """(h) peak memory of a student's Ray Train worker with 50k vs 200k distillation targets (the
    demo's small corpus, one epoch on a frozen prefix; the targets folder also holds other crops')."""
    from aver.data.manifests import read_affectnet, read_fec

    data = _student_corpus(work)
    ids = sorted({r["crop_id"] for r in read_affectnet(data["affectnet"]).records}
                 | {f["crop_id"] for r in read_fec(data["fec"]).records for f in r["faces"]})
    rng = np.random.default_rng(0)
    figures = {}
    for n in (small, large):
        targets = os.path.join(work, f"targets{n}")
        everything = ids + [f"elsewhere-{i:07d}" for i in range(n - len(ids))]
        for p in range(0, n, 10_000):  # distill writes parts of this order (one per unit)
            _targets_part(os.path.join(targets, "targets", f"part{p // 10_000:03d}.parquet"), everything[p:p + 10_000],
                          rng)
        figures[n] = peak_memory_of_job(_student_job(data, os.path.join(work, f"student{n}"), "--targets", targets,
                                                     "--freeze", "transition3"), only="RayTrainWorker")
    (p1, u1), (p4, u4) = (figures[small].pss, figures[small].uss), (figures[large].pss, figures[large].uss)
    return (f"## (h) student training worker peak memory, {small // 1000}k vs {large // 1000}k targets\n\n"
            f"train_student for one epoch on the demo's small corpus (frozen prefix), with a distill output of "
            f"{small} vs {large} targets (the corpus's crops and others'); the Ray Train worker's own memory "
            f"(USS: what it holds privately, targets included) and its PSS (plus its share of the object store "
            f"pages it read, which moves between runs with how many blocks were in flight).\n\n"
            f"| targets | worker peak USS MiB | worker peak PSS MiB |\n|---|---|---|\n"
            f"| {small} | {u1:.0f} | {p1:.0f} |\n| {large} | {u4:.0f} | {p4:.0f} |\n\n"
            f"**Ratio {u4 / u1:.2f}** of the USS peaks (target <= 1.3); {p4 / p1:.2f} of the PSS peaks.\n")


def prefix_shard_memory(work: str, shard: int = 1500, share: float = 0.002) -> str:
    """(h, extended) a student worker's anonymous memory with ``shard`` vs 4x ``shard`` unlabeled
    crops in its frozen-prefix cache, both over the heap budget (needs (a)'s faces)."""
    data = dict(_student_corpus(work))
    with open(data["affectnet"]) as f:  # two steps of AffectNet: what is measured is the cache, built first
        head = f.read().splitlines()[:17]
    data["affectnet"] = os.path.join(work, "student-corpus", "affectnet", "training16.csv")
    with open(data["affectnet"], "w") as f:
        f.write("\n".join(head) + "\n")
    crops = _bench_crops(work, 256)
    rng = np.random.default_rng(1)
    runs = [(shard, share), (4 * shard, share), (4 * shard, 0.25)]
    anon = {}
    for n, s in runs:
        folder = os.path.join(work, f"shard{n}")
        if not os.path.exists(folder):
            _packed_faces(folder, (crops * (n // len(crops) + 1))[:n])
            for p in range(0, n, 256):  # distill's targets, a part per faces part
                _targets_part(os.path.join(folder, "distill", "targets", f"part{p // 256:04d}.parquet"),
                              [f"b-{i:07d}" for i in range(p, min(n, p + 256))], rng)
        anon[n, s] = peak_memory_of_job(_student_job(
            data, os.path.join(work, f"student-shard{n}-{s}"), "--targets", os.path.join(folder, "distill"),
            "--unlabeled", folder, "--freeze", "pool0", "--cache-memory-share", str(s)), only="RayTrainWorker").anon
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    per_crop = 64 * 35 * 35 * 2 / 2**10  # pool0's output at 140 px, float16
    a1, a4, heap = anon[shard, share], anon[4 * shard, share], anon[4 * shard, 0.25]
    return (f"### (h) a frozen-prefix shard 4x as large\n\n"
            f"The student (16 AffectNet rows: two steps) with {shard} vs {4 * shard} unlabeled crops (faces parts "
            f"and their targets), frozen up "
            f"to pool0: its cache holds {per_crop:.0f} kB a crop ({shard * per_crop / 1024:.0f} vs "
            f"{4 * shard * per_crop / 1024:.0f} MiB), over the {share * memory:.0f} MiB heap budget of "
            f"`--cache-memory-share {share}` on this machine (the default 0.25 is that regime for the paper's "
            f"~15 GB a worker), so it lives in a mapped file on local disk. The worker's peak anonymous memory "
            f"(RssAnon), and the large shard kept in the heap (the default share, {0.25 * memory / 1024:.0f} GiB "
            f"here) for comparison:\n\n| unlabeled crops | cache | worker peak RssAnon MiB |\n|---|---|---|\n"
            f"| {shard} | mapped file | {a1:.0f} |\n| {4 * shard} | mapped file | {a4:.0f} |\n"
            f"| {4 * shard} | heap | {heap:.0f} |\n\n**Ratio {a4 / a1:.2f}** (target <= 1.2); "
            f"{heap / a1:.2f} with the large cache in the heap.\n")


def _timed_pass(datasets: dict) -> tuple[float, int]:
    """Seconds to iterate every dataset to its end with a consumer that does nothing, and the images
    delivered (an FEC row holds three)."""
    t, n = time.perf_counter(), 0
    for name, ds in datasets.items():
        for batch in ds.iter_batches(batch_size=64):
            n += len(next(iter(batch.values()))) * (3 if name == "fec" else 1)
    return time.perf_counter() - t, n


def training_reads(work: str, latency_s: float = 0.02, copies: int = 4) -> str:
    """(l) the student's datasets (AffectNet, FEC triplets, unlabeled images) to a no-op consumer:
    images on a local S3 behind a proxy adding ``latency_s`` to every request, against on local
    disk; and the reads one at a time per task, as before issue 30."""
    import glob
    import shutil

    import fsspec

    from aver.data.faces import Reading, affectnet_dataset, fec_dataset, unlabeled_dataset
    from aver.demo.s3proxy import S3Proxy, local_s3

    data = _student_corpus(work)
    local = os.path.join(work, "reads")
    os.makedirs(local, exist_ok=True)
    with open(data["affectnet"]) as f:  # each row ``copies`` times: enough reads to time
        header, *rows = f.read().splitlines()
    with open(os.path.join(local, "training.csv"), "w") as f:
        f.write("\n".join([header] + rows * copies) + "\n")
    with open(data["fec"]) as f:
        triplets = f.read().splitlines()
    with open(os.path.join(local, "fec.csv"), "w") as f:
        f.write("\n".join(triplets * copies) + "\n")
    unlabeled = os.path.join(local, "unlabeled")
    os.makedirs(unlabeled, exist_ok=True)
    for k in range(copies):
        for p in sorted(glob.glob(os.path.join(data["unlabeled"], "*.jpg"))):
            shutil.copy(p, os.path.join(unlabeled, f"{k}-{os.path.basename(p)}"))

    def deliver(root: str, images: dict, reading: Reading) -> tuple[float, int]:
        aff, _ = affectnet_dataset(f"{root}/training.csv", images["affectnet"], reading=reading)
        fec, _ = fec_dataset(f"{root}/fec.csv", images["fec"], reading=reading)
        return _timed_pass({"affectnet": aff, "fec": fec, "unlabeled": unlabeled_dataset(f"{root}/unlabeled",
                                                                                           reading=reading)})

    figures = {}
    disk = {"affectnet": data["affectnet_images"], "fec": data["fec_images"]}
    deliver(local, disk, Reading())  # Ray Data's start-up, not timed
    figures["disk"] = deliver(local, disk, Reading())
    with local_s3("bench-reads") as store:
        proxy = S3Proxy(store["endpoint"], latency_s=latency_s)
        try:
            fs = fsspec.filesystem("s3", **store["options"])
            root = "s3://bench-reads/student"
            files = [p for p in glob.glob(os.path.join(local, "**", "*"), recursive=True) if os.path.isfile(p)]
            fs.put(files, [f"{root}/{os.path.relpath(p, local)}" for p in files])
            for name, folder in disk.items():
                files = sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))
                fs.put(files, [f"{root}/{name}-images/{os.path.relpath(p, folder)}" for p in files])
            remote = {name: f"{root}/{name}-images" for name in disk}
            so = proxy.options(store["options"])
            figures["s3"] = deliver(root, remote, Reading(storage_options=so))
            figures["s3, one read at a time"] = deliver(root, remote, Reading(storage_options=so, io_threads=1))
            proxy.latency_s = 0.0  # the same requests through the same proxy, without the distance
            figures["s3, no latency"] = deliver(root, remote, Reading(storage_options=so))
        finally:
            proxy.close()
    rate = {k: n / s for k, (s, n) in figures.items()}
    n = figures["disk"][1]
    return (f"## (l) training reads from S3 with {latency_s * 1000:.0f} ms per request vs local disk\n\n"
            f"The student's three datasets (AffectNet rows, FEC triplets: three images each, unlabeled images: "
            f"the demo's small corpus, each row {copies} times; {n} images a pass) read to their end by a "
            f"consumer that does nothing; 16 reads in flight per task (`--io-threads`).\n\n"
            f"| images | images/s |\n|---|---|\n| local disk | {rate['disk']:.0f} |\n"
            f"| local S3 (moto) behind a {latency_s * 1000:.0f} ms proxy | {rate['s3']:.0f} |\n"
            f"| the same S3, one read at a time per task (before issue 30) | {rate['s3, one read at a time']:.0f} |\n"
            f"| the same S3 and proxy, no latency added | {rate['s3, no latency']:.0f} |"
            f"\n\n**Ratio {rate['s3'] / rate['disk']:.2f}** (target >= 0.8); "
            f"{rate['s3, one read at a time'] / rate['disk']:.2f} one read at a time; the {latency_s * 1000:.0f} ms "
            f"latency costs {1 - rate['s3'] / rate['s3, no latency']:.0%} of the rate without it.\n")


def packed_reads(work: str, n_crops: int, latency_s: float = 0.02) -> str:
    """(m) unlabeled crops delivered from faces parts vs from one S3 object per crop (needs (a)'s faces)."""
    import fsspec

    from aver.data.faces import Reading, unlabeled_dataset
    from aver.demo.s3proxy import S3Proxy, local_s3

    crops = _bench_crops(work, n_crops)
    figures = {}
    with local_s3("bench-packed") as store:
        proxy = S3Proxy(store["endpoint"], latency_s=latency_s)
        try:
            layouts = _both_layouts(fsspec.filesystem("s3", **store["options"]), "bench-packed", crops)
            reading = Reading(storage_options=proxy.options(store["options"]))
            _timed_pass({"warm-up": unlabeled_dataset(layouts["faces parts"], reading=reading)})
            for layout, source in layouts.items():
                before = proxy.requests
                seconds, n = _timed_pass({layout: unlabeled_dataset(source, reading=reading)})
                figures[layout] = (n / seconds, proxy.requests - before)
        finally:
            proxy.close()
    (parts, parts_req), (objects, objects_req) = figures["faces parts"], figures["one object per crop"]
    return (f"## (m) unlabeled crops from faces parts vs one S3 object per crop\n\n"
            f"{len(crops)} crops on a local S3 (moto) behind a {latency_s * 1000:.0f} ms proxy, read by the "
            f"student's unlabeled dataset to a consumer that does nothing: as extract_faces writes them (faces "
            f"parts of 256 crops, {parts_req} requests) and as single JPEG objects ({objects_req} requests), "
            f"16 reads in flight per task either way.\n\n| layout | crops/s |\n|---|---|\n"
            f"| faces parts | {parts:.0f} |\n| one object per crop | {objects:.0f} |\n\n"
            f"**Ratio {parts / objects:.1f}x** (target >= 3x).\n")


HOW = (
    "## How these are measured\n\n"
    "Each ratio compares two runs on the same data in this one invocation, with the same share of the "
    "machine: the pipelines hold every CPU (one actor, or for (a) one single-thread detector actor per CPU, "
    "with half a CPU for the load and write tasks), the baselines run in one process. Pipeline "
    "timings include Ray Data start-up and actor construction (model loading), which is why the corpora "
    "are large enough to amortise them as a real corpus would. (a) gains come from detection on "
    "a frame downscaled to 640 px (made in the decoding task) with boxes mapped back, and from decoding in "
    "load tasks while the actors run MTCNN. (c) and (e) sum the PSS (and the RSS) of the driver and all "
    "local Ray processes, sampled every 0.1 s.\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", default=os.path.join(ROOT, "docs", "benchmarks.md"), help="Markdown file to write")
    p.add_argument("--videos", type=int, default=36, help="720p videos of 8 s in the speed corpus (default 36);"
                   " large enough that Ray's and the actor's start-up (~8 s) is amortised as on a real corpus")
    p.add_argument("--score-videos", type=int, default=4, help="20 s talking videos in the score_videos run (default 4)")
    p.add_argument("--crops", type=int, default=768, help="crops in the distill comparisons and (m) (default 768)")
    p.add_argument("--count-driver-bytes", metavar="FILE", help=argparse.SUPPRESS)  # (k)'s driver, then the job
    a, job = p.parse_known_args()
    if a.count_driver_bytes:
        return _count_driver_bytes_of(a.count_driver_bytes, [arg for arg in job if arg != "--"])

    import ray
    import torch

    from aver.pipelines.cluster import keep_task_workers

    began = time.perf_counter()
    work = tempfile.mkdtemp(prefix="aver-bench-")
    corpus = os.path.join(work, "videos")
    _corpus(corpus, a.videos, seconds=8.0)
    cpus = float(os.cpu_count() or 1)
    lines = []
    took: list[str] = []

    def measure(label: str, figure, *args):
        t = time.perf_counter()
        out = figure(*args)
        seconds = f"{time.perf_counter() - t:.0f} s"
        took.append(f"{label} {seconds}")
        print(f"bench: ({label}) took {seconds}", file=sys.stderr, flush=True)
        return out

    keep_task_workers()  # (a), (b) and (f) run in this process, on the local Ray a job would start
    ray.init(include_dashboard=False, log_to_driver=False)
    lines.append(measure("a", extract_speed, work, corpus, a.videos, cpus))
    text, bare = measure("b", distill_efficiency, work, a.crops, cpus)
    lines.append(text)
    lines.append(measure("f", remote_distill_efficiency, work, a.crops, cpus, bare))
    lines.append(measure("n", clip_speed, work, cpus))
    lines.append(measure("l", training_reads, work))
    lines.append(measure("m", packed_reads, work, a.crops))
    ray.shutdown()  # (c)-(e) run the jobs as a user would, each with its own local Ray
    for label, figure, args in (("c", extract_memory, (work, cpus)), ("d", score_speed, (work, a.score_videos, cpus)),
                                ("e", score_memory, (work, cpus)), ("g", planning_scale, (work,)),
                                ("h", student_memory, (work,)), ("h, shard", prefix_shard_memory, (work,)),
                                ("j", long_video_memory, (work, cpus)), ("k", driver_bytes, (work, cpus))):
        lines.append(measure(label, figure, *args))
    minutes = (time.perf_counter() - began) / 60
    lines.insert(0, f"# Benchmarks\n\nMeasured by `make bench` on {os.cpu_count()} CPUs, "
                    f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'no GPU'}; "
                    f"{time.strftime('%Y-%m-%d')}: {minutes:.1f} minutes in all (the corpus of (a) included; "
                    f"{', '.join(took)}).\n")
    from bench_gpu import gpu_section  # jobs/, beside this file

    lines.append(gpu_section(a.report))  # `make bench-gpu`'s figures, kept as they were
    lines.append(HOW)
    report = "\n".join(lines)
    print(report)
    with open(a.report, "w") as f:
        f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
