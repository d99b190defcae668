#!/usr/bin/env python
"""`make bench-gpu`: the GPU figures of the batch jobs, measured on their own stage code without Ray.

Each job's load function (the CPU task) and model stage (the GPU actor) are imported from ``aver``
and driven directly, in this one process, on synthetic 720p videos and face crops made on the spot:

- distill: crops/s of the bare teacher pair (bf16 on CUDA, inputs already on the device) against
  the job's model stage (:class:`~aver.pipelines.distill.TeacherPair`) on the same crops;
- extract_faces and score_videos: the model stage's throughput (sampled frames/s; seconds of video
  per second) and the load stage's per CPU core (sampled frames, or seconds of video, per CPU-second:
  how many cores one GPU needs follows);
- for each model stage, the GPU's busy fraction: the union of its kernels' intervals (torch
  profiler) over the wall time of the profiled calls, not nvidia-smi's utilisation.

Each figure is printed and appended to ``OUT/figures.txt`` the moment it is measured, so a run cut
short still leaves what it measured. Without CUDA the same code runs at small sizes on the CPU (about
a minute; the suite runs it so it cannot rot). With CUDA, ``--report`` writes the figures into the GPU
section of docs/benchmarks.md. It imports neither Ray nor s3fs, installs nothing and reads no network.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # aver, run from anywhere

GOALS = {"distill": "distill >= 10,000 crops/s per GPU", "extract": "extract_faces >= 500 sampled 720p frames/s",
         "score": "score_videos >= 100 s of video/s", "busy": "GPU busy >= 0.8"}


@dataclass
class Sizes:
    """How much each measurement runs (the GPU's, or the CPU's small ones)."""

    crops: int
    """Crops through the teacher pair per timed pass."""
    distill_batch: int
    """distill --batch-size."""
    video_s: float
    """Seconds of each synthetic video."""
    width: int
    """Frame width (720p on the GPU)."""
    height: int
    """Frame height."""
    videos: int
    """Videos per model-stage pass (their segments batched together, as a pool's actor gets them)."""
    repeats: int
    """Timed passes of each model stage (after one warm-up pass)."""


GPU = Sizes(crops=16384, distill_batch=512, video_s=20.0, width=1280, height=720, videos=4, repeats=3)
CPU = Sizes(crops=32, distill_batch=16, video_s=2.0, width=320, height=180, videos=1, repeats=1)


class Figures:
    """Prints each figure and appends it to ``OUT/figures.txt`` at once (a cut-short run keeps it)."""

    def __init__(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "figures.txt")
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of ``fn`` (one warm-up call first)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def busy_fraction(fn, device: torch.device) -> float | None:
    """Share of the wall time of one call of ``fn`` during which some GPU kernel ran: the union of
    the kernels' intervals (torch profiler), so overlapping streams count once. None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        _sync(device)
        wall_us = (time.perf_counter() - t) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, -1.0
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return min(1.0, busy / wall_us) if wall_us else None


def busy_text(fn, device: torch.device) -> str:
    """:func:`busy_fraction` as the figure line shows it; a profiler failure is said, not raised
    (the throughput figures already measured must not be lost to it)."""
    try:
        b = busy_fraction(fn, device)
    except Exception as e:  # noqa: BLE001
        return f"not measured ({type(e).__name__}: {e})"
    return "n/a (no CUDA)" if b is None else f"{b:.2f}"


def cpu_seconds(fn) -> tuple[object, float, float]:
    """``(fn(), wall s, CPU s of this process)``: a load stage's cost per core."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


# -- synthetic inputs ---------------------------------------------------------------------------------

def _face(h: int, w: int) -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()[30:210, 140:310]).resize((w, h)))


def face_crops(n: int) -> np.ndarray:
    """``[n,140,140,3]`` uint8: a real face, jittered so no two crops are equal."""
    rng = np.random.default_rng(0)
    face = _face(140, 140).astype(np.int16)
    return np.clip(face[None] + rng.integers(-12, 13, (n, 1, 1, 3)), 0, 255).astype(np.uint8)


def talking_video(path: str, seconds: float, w: int, h: int, fps: float = 25.0, seed: int = 0) -> None:
    """A video at ``fps`` with a face moving across a noisy background and a synthetic voice."""
    from aver.constants import SAMPLE_RATE
    from aver.demo.corpus import smooth_trajectory, voice
    from aver.demo.media import write_video

    rng = np.random.default_rng(seed)
    fw, fh = (round(d * h / 720) // 2 * 2 for d in (300, 320))
    face = _face(fh, fw)
    bg = rng.integers(40, 160, (h, w, 3), dtype=np.uint8)
    n = int(seconds * fps)

    def frames():
        for i in range(n):
            img = bg.copy()
            x = round((w - fw) * (0.5 + 0.4 * np.sin(i / fps)))
            y = (h - fh) // 2
            img[y:y + fh, x:x + fw] = face
            yield img

    steps = int(seconds / 0.04)
    audio = voice(smooth_trajectory(steps, rng), smooth_trajectory(steps, rng), rng)[: int(seconds * SAMPLE_RATE)]
    write_video(path, frames(), fps, audio=audio)


def _unit(path: str):
    from aver.io.media import item_id_for
    from aver.pipelines.ledger import Unit

    item_id = item_id_for(path)
    return Unit(item_id, [{"source": path, "item_id": item_id, "kind": "video", "refusal": None}])


def _records(load_unit, units, cfg) -> tuple[list, float, float]:
    """Every record the load stage makes of ``units``, its wall and CPU seconds."""
    return cpu_seconds(lambda: [r for u in units for r in load_unit(u, cfg)])


# -- the three jobs -----------------------------------------------------------------------------------

def bench_distill(work: str, sizes: Sizes, device: torch.device, figures: Figures) -> None:
    from aver.models import Teacher, autocast, save_checkpoint
    from aver.pipelines.distill import DistillConfig, TargetsRecord, TeacherPair, teacher_targets

    torch.manual_seed(0)
    t128, t256 = Teacher(d_face=128), Teacher(d_face=256)
    t256.trunk.load_state_dict(t128.trunk.state_dict())  # the paper's pair: one frozen FaceNet trunk
    paths = []
    for t in (t128, t256):
        paths.append(os.path.join(work, f"teacher{t.config.d_face}.pt"))
        save_checkpoint(t.eval(), paths[-1])
    crops = face_crops(sizes.crops)
    gpus = 1.0 if device.type == "cuda" else 0.0
    cfg = DistillConfig(input=work, teachers=tuple(paths), output=work, batch_size=sizes.distill_batch,
                        gpus_per_actor=gpus, cpus_per_actor=float(os.cpu_count() or 1))
    stage = TeacherPair(cfg)

    # bare: the same networks, the crops already standardised on the device, nothing else
    pair = [t.to(device, memory_format=torch.channels_last).eval() for t in (t128, t256)]
    x = Teacher.preprocess(crops, device)
    b = sizes.distill_batch

    @torch.inference_mode()
    def bare():
        with autocast(device):
            for s in range(0, len(x), b):
                trunk = pair[0].trunk(x[s:s + b])
                teacher_targets(*(t(trunk, after="trunk") for t in pair))

    def job_stage():
        records = [TargetsRecord(unit=None, ids=[str(i) for i in range(s, min(s + 1024, len(crops)))],
                                 images=crops[s:s + 1024]) for s in range(0, len(crops), 1024)]
        stage.run(records)

    bare_s, stage_s = timed(bare, device, sizes.repeats), timed(job_stage, device, sizes.repeats)
    n = len(crops)
    figures.add(f"distill: bare teacher pair {n / bare_s:,.0f} crops/s, model stage {n / stage_s:,.0f} crops/s "
                f"(stage/bare {bare_s / stage_s:.2f}; goal {GOALS['distill']})")
    figures.add(f"distill: GPU busy {busy_text(job_stage, device)} in the model stage")


def bench_extract(work: str, sizes: Sizes, device: torch.device, figures: Figures) -> None:
    from aver.pipelines.extract import ExtractFacesConfig, FaceExtractor, load_unit

    units = [_unit(os.path.join(work, f"talk{v}.mp4")) for v in range(sizes.videos)]
    gpus = 1.0 if device.type == "cuda" else 0.0
    cfg = ExtractFacesConfig(input=work, output=work, gpus_per_actor=gpus, cpus_per_actor=float(os.cpu_count() or 1))
    records, wall, cpu = _records(load_unit, units, cfg)
    frames = sum(len(r.frames) for r in records if r.frames)
    figures.add(f"extract_faces: load stage {frames / cpu:,.1f} sampled {sizes.height}p frames per CPU-second "
                f"({frames} frames in {wall:.2f} s)")
    stage = FaceExtractor(cfg)
    batch = [r for r in records if r.frames]

    def model():
        for r in batch:
            r.detected = None
        stage.run(batch)

    took = timed(model, device, sizes.repeats)
    figures.add(f"extract_faces: model stage {frames / took:,.1f} sampled {sizes.height}p frames/s "
                f"(goal {GOALS['extract']})")
    figures.add(f"extract_faces: GPU busy {busy_text(model, device)} in the model stage")

    # before and after issue 29: facenet-pytorch's detect_face (a resize per candidate box, the host
    # between stages) against the batched MTCNN, same networks, the same detection views
    from facenet_pytorch.models.utils.detect_face import detect_face

    views = np.stack([f.view[0] for r in batch for f in r.frames][:cfg.detector.batch_size])
    mtcnn = stage.detector.mtcnn
    on_device = torch.from_numpy(views).to(device).permute(0, 3, 1, 2)

    def upstream():
        with torch.no_grad():
            detect_face(views, mtcnn.min_face_size, mtcnn.pnet, mtcnn.rnet, mtcnn.onet, list(mtcnn.thresholds),
                        mtcnn.factor, device)

    old_s, new_s = timed(upstream, device, sizes.repeats), timed(lambda: mtcnn(on_device)[0].cpu(), device, sizes.repeats)
    figures.add(f"extract_faces: MTCNN on {len(views)} views {views.shape[2]}x{views.shape[1]}: facenet-pytorch "
                f"{len(views) / old_s:,.1f} frames/s, batched {len(views) / new_s:,.1f} frames/s ({old_s / new_s:.2f}x)")


def bench_score(work: str, sizes: Sizes, device: torch.device, figures: Figures) -> None:
    from aver.models import Student, VGGishEmotion, save_checkpoint
    from aver.pipelines.score import ScoreVideosConfig, VideoScorer, load_unit

    models = os.path.join(work, "models")
    os.makedirs(models, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(Student().eval(), os.path.join(models, "student.pt"))
    for dim in ("arousal", "valence"):
        save_checkpoint(VGGishEmotion().eval(), os.path.join(models, f"vggish_{dim}.pt"))
    units = [_unit(os.path.join(work, f"talk{v}.mp4")) for v in range(sizes.videos)]
    gpus = 1.0 if device.type == "cuda" else 0.0
    cfg = ScoreVideosConfig(input=work, output=work, model=models, gpus_per_actor=gpus,
                            cpus_per_actor=float(os.cpu_count() or 1))
    records, wall, cpu = _records(load_unit, units, cfg)
    seconds = sizes.video_s * len(units)
    figures.add(f"score_videos: load stage {seconds / cpu:,.1f} s of {sizes.height}p video per CPU-second "
                f"(frames and log-mel of {seconds:.0f} s in {wall:.2f} s)")
    stage = VideoScorer(cfg)
    batch = [r for r in records if r.frames or r.mel is not None]

    def model():
        for r in batch:
            r.detected, r.audio = None, None
        stage.run(batch)

    took = timed(model, device, sizes.repeats)
    figures.add(f"score_videos: model stage {seconds / took:,.1f} s of video/s (goal {GOALS['score']})")
    figures.add(f"score_videos: GPU busy {busy_text(model, device)} in the model stage")


HEADING = "## GPU figures"
HOW_TO_RUN = """\
How to measure them: on a machine with the registry, `make gpu-wheels` puts the cp312 wheels of what
the GPU machine lacks (PyAV, facenet-pytorch, fsspec: about 38 MiB) in `gpu-wheels/`; take that folder
along with the checkout (no venv, no Ray: the bench drives the stage code directly). There, the one
command (a few minutes on one GPU; each figure lands in `$OUT/figures.txt` as it is measured):

```sh
python -m pip install --no-index --no-deps --target .gpu-site gpu-wheels/*.whl && PYTHONPATH=.gpu-site python jobs/bench_gpu.py --out "$OUT" --report docs/benchmarks.md
```
"""


def gpu_section(report: str) -> str:
    """The GPU section of ``report`` as it stands (what the last `make bench-gpu` on a GPU wrote),
    or a section saying what is still to be measured and how."""
    text = open(report).read() if os.path.exists(report) else ""
    if HEADING + "\n" in text:
        section = HEADING + "\n" + text.split(HEADING + "\n", 1)[1].split("\n## ", 1)[0].rstrip() + "\n"
        if "Measured " in section:
            return section
    return (f"{HEADING}\n\nStill to be measured (no GPU has run `make bench-gpu` yet): "
            + "; ".join(GOALS.values()) + ".\n\n" + HOW_TO_RUN)


def write_report(path: str, figures: Figures, device_name: str) -> None:
    """Replace the GPU section of ``path`` (docs/benchmarks.md) with these figures."""
    text = open(path).read() if os.path.exists(path) else ""
    body = (f"{HEADING}\n\nMeasured {datetime.date.today()} by `make bench-gpu` on {device_name}, torch "
            f"{torch.__version__}. Goals: " + "; ".join(GOALS.values()) + ".\n\n```text\n"
            + "\n".join(figures.lines) + "\n```\n\n" + HOW_TO_RUN)
    if HEADING + "\n" in text:
        before, rest = text.split(HEADING + "\n", 1)
        after = rest.split("\n## ", 1)
        text = before + body + ("\n## " + after[1] if len(after) > 1 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-gpu-out",
                   help="folder for figures.txt, each figure appended as it is measured (default: $OUT, else "
                        "./bench-gpu-out)")
    p.add_argument("--report", default=None,
                   help="Markdown file whose GPU section gets the figures, on CUDA only (e.g. docs/benchmarks.md)")
    p.add_argument("--only", nargs="*", choices=("distill", "extract", "score"), default=None,
                   help="measure only these jobs (default: all three)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU if device.type == "cuda" else CPU
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores; small sizes)"
    figures = Figures(args.out)
    figures.add(f"bench-gpu on {name}: {sizes.videos} video(s) of {sizes.video_s:g} s at "
                f"{sizes.width}x{sizes.height}, {sizes.crops} crops")
    start = time.perf_counter()
    only = args.only or ["distill", "extract", "score"]
    with tempfile.TemporaryDirectory() as work:
        if "extract" in only or "score" in only:
            for v in range(sizes.videos):
                talking_video(os.path.join(work, f"talk{v}.mp4"), sizes.video_s, sizes.width, sizes.height, seed=v)
        failed = 0
        for job, fn in (("distill", bench_distill), ("extract", bench_extract), ("score", bench_score)):
            if job in only:
                try:
                    fn(work, sizes, device, figures)
                except Exception as e:  # noqa: BLE001 - the other jobs' figures are still worth the GPU time
                    failed += 1
                    figures.add(f"{job}: failed: {type(e).__name__}: {e}")
    figures.add(f"bench-gpu: done in {time.perf_counter() - start:.0f} s" + (f", {failed} failed" if failed else ""))
    if args.report and device.type == "cuda":
        write_report(args.report, figures, name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
