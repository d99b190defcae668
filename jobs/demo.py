#!/usr/bin/env python
"""`make demo`: the whole pipeline, offline, on an embedded local Ray and a generated corpus.

corpus -> fetch FEC images -> teacher x2 -> distill -> student (distilled and not) -> VGGish x2
-> fusion (fused, visual-only, audio-only) -> evaluate -> score the corpus's video archive.
Checkpoints land in OUTPUT/models/, metrics in OUTPUT/eval/metrics.json, the archive's labels and
report in OUTPUT/scores/ (open OUTPUT/scores/report/index.html). The demo recipe is short to fit 2 CPUs: no pretrained weights
exist offline, so trunks start random and stay frozen: the teachers train everything after the
FaceNet trunk, the students DenseNet201's last dense block, norm5 and the heads, each on frozen
outputs computed once; every stage trains for a few epochs. It proves the wiring learns, not the
paper's numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from aver.console import VERBOSE_ENV, duration, init_ray
from aver.demo.corpus import write_corpus
from aver.losses import FaceLossConfig
from aver.pipelines.distill import DistillConfig
from aver.pipelines.distill import run as distill
from aver.pipelines.evaluate import EvaluateConfig
from aver.pipelines.evaluate import run as evaluate
from aver.pipelines.fetch import FetchConfig
from aver.pipelines.fetch import run as fetch
from aver.pipelines.score import ScoreVideosConfig
from aver.pipelines.score import run as score
from aver.train.face import StudentTrainConfig, TeacherTrainConfig
from aver.train.face import run as train_face
from aver.train.fusion import FusionTrainConfig
from aver.train.fusion import run as train_fusion
from aver.train.vggish import VGGishTrainConfig
from aver.train.vggish import run as train_vggish


@dataclass
class Demo:
    """Where the demo writes and how long it trains."""

    out: str
    seed: int
    size: str
    epochs_scale: float

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def epochs(self, n: int) -> int:
        return max(1, round(n * self.epochs_scale))

    @property
    def cpus(self) -> float:  # single-worker stages reserve every CPU
        return float(os.cpu_count() or 1)

    @property
    def one_actor(self) -> dict:
        """One model actor with every CPU but half of one, left to the load and write tasks."""
        return {"actors": 1, "cpus_per_actor": self.cpus - 0.5, "cpus_per_task": 0.5}

    @property
    def common(self) -> dict:
        # One worker per stage reserving 1 CPU (Ray Data feeds it from the rest); it still runs torch
        # on every core (threads_per_worker=0).
        return {"output": self.out, "cpus_per_worker": 1.0, "seed": self.seed, "log_every": 5}

    @property
    def faces(self) -> dict:
        corpus = self.path("corpus")
        return {"affectnet": os.path.join(corpus, "affectnet", "training.csv"),  # images found beside it
                "fec": os.path.join(corpus, "fec", "faceexp-comparison-data-train-public.csv")}


def corpus(d: Demo) -> None:
    if not os.path.exists(d.path("corpus", "recola")):
        print(write_corpus(d.path("corpus"), seed=d.seed, size=d.size))
    fec = d.path("corpus", "fec")
    fetch(FetchConfig(manifest=tuple(os.path.join(fec, f"faceexp-comparison-data-{split}-public.csv")
                                     for split in ("train", "test")), output=fec, allow_file_urls=True))
    init_ray(num_cpus=os.cpu_count())  # with its dashboard: Ray Train's cleaner asks its State API


def teachers(d: Demo) -> None:
    train_face(TeacherTrainConfig(**d.common, **d.faces, epochs=d.epochs(14), batch_size=32, lr=2e-3,
                                  lr_schedule="cosine", d_face=(128, 256), freeze="trunk"))


def distill_targets(d: Demo) -> None:
    corpus = d.path("corpus")
    teacher_uris = (d.path("models", "teacher128.pt"), d.path("models", "teacher256.pt"))
    distill(DistillConfig(input=(d.faces["affectnet"], d.faces["fec"], os.path.join(corpus, "unlabeled")),
                          teachers=teacher_uris, output=d.path("distill"), batch_size=64, **d.one_actor))


def students(d: Demo) -> None:
    for name, targets in (("student", d.path("distill")), ("student_nodistill", None)):
        print(name, flush=True)
        # 16 a step (the library's default): twice the steps of 32 for the same images and time; the
        # student at 32 was still learning when its 5 epochs ended (docs/decisions.md, issue 32)
        train_face(StudentTrainConfig(
            **d.common, **d.faces, name=name, epochs=d.epochs(5), batch_size=16, lr=1e-3, lr_schedule="cosine",
            targets=targets, unlabeled=d.path("corpus", "unlabeled") if targets else None, freeze="transition3",
            loss=FaceLossConfig(rkd_distance_weight=5.0, rkd_angle_weight=10.0)))


def vggish(d: Demo) -> None:
    train_vggish(VGGishTrainConfig(**d.common, recola=d.path("corpus", "recola"), dimension=("arousal", "valence"),
                                   epochs=d.epochs(8), batch_size=16, lr=1e-4, segment_frames=96, hop_frames=20,
                                   freeze="features"))


def fusion(d: Demo) -> None:
    train_fusion(FusionTrainConfig(
        **d.common, recola=d.path("corpus", "recola"), student=d.path("models", "student.pt"),
        vggish_arousal=d.path("models", "vggish_arousal.pt"), vggish_valence=d.path("models", "vggish_valence.pt"),
        variants=("fused", "visual", "audio"), epochs=d.epochs(10), batch_size=16, lr=1e-3, featurizer_cpus=d.cpus))


def evaluation(d: Demo) -> None:
    evaluate(EvaluateConfig(models=d.path("models"), data=d.path("corpus"), output=d.path("eval"), prefix_cache=d.out,
                            featurizer_cpus=d.cpus - 0.5, cpus_per_task=0.5, data_name="synthetic demo corpus"))


def archive(d: Demo) -> None:
    score(ScoreVideosConfig(input=d.path("corpus", "archive"), output=d.path("scores"), model=d.path("models"),
                            **d.one_actor))


STAGES = [
    ("corpus: generate it, fetch the FEC images, start Ray", corpus),
    ("teachers d_face 128 and 256 (random FaceNet trunk, frozen; the same trunk for both, as in the paper)",
     teachers),
    ("distill: both teachers' targets for AffectNet, FEC and the unlabeled faces", distill_targets),
    ("students, distilled and not (random DenseNet201, frozen up to transition3)", students),
    ("VGGish arousal and valence (random conv stack, frozen; the FC layers train)", vggish),
    ("fusion: fused, visual-only, audio-only", fusion),
    ("evaluate (Tables 1-5)", evaluation),
    ("score_videos on the demo archive (speech + face, face only, audio only, no face, broken)", archive),
]


def training_curves(d: Demo) -> list[str]:
    """A picture of every run's curves beside the evaluation's metrics table (eval/curves/NAME.png,
    from each model's NAME.metrics.json), listed in the table."""
    import glob
    import json

    from aver.pipelines.report import curves_png

    os.makedirs(d.path("eval", "curves"), exist_ok=True)
    written = []
    for path in sorted(glob.glob(d.path("models", "*.metrics.json"))):
        name = os.path.basename(path)[: -len(".metrics.json")]
        with open(path) as f:
            png, _ = curves_png(json.load(f), name)
        written.append(d.path("eval", "curves", f"{name}.png"))
        with open(written[-1], "wb") as f:
            f.write(png)
    with open(d.path("eval", "metrics.md")) as f:
        table = f.read().split("\n## Training curves\n")[0]  # a rerun's evaluate may have left it as it was
    with open(d.path("eval", "metrics.md"), "w") as f:
        f.write(table.rstrip("\n") + "\n\n## Training curves\n\n"
                + "".join(f"- [{os.path.basename(p)[:-4]}](curves/{os.path.basename(p)})\n" for p in written))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo", help="demo folder (default outputs/demo)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--size", default="medium", choices=["small", "medium"], help="corpus size (default medium)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (default 1)")
    p.add_argument("--verbose", action="store_true", help="Ray's own log lines on the terminal too")
    a = p.parse_args(argv)
    if a.verbose:
        os.environ[VERBOSE_ENV] = "1"
    d = Demo(os.path.abspath(a.output), a.seed, a.size, a.epochs_scale)
    started = time.time()
    for title, stage in STAGES:
        print(f"\n=== [{duration(time.time() - started)}] {title}", flush=True)
        stage(d)
    curves = training_curves(d)
    with open(d.path("eval", "metrics.md")) as f:
        table = f.read().split("\n## Training curves\n")[0]
    print(f"\ndemo finished in {duration(time.time() - started)}\n\n{table}\n"
          f"training curves of {len(curves)} runs: file://{d.path('eval', 'curves')}/ (linked from metrics.md)\n"
          f"report: file://{d.path('scores', 'report', 'index.html')}"
          f"\nmodels: {d.path('models')}\n\nscore your own videos with these models:\n"
          f"  python jobs/score_videos.py --input YOUR_VIDEOS/ --output scores/ --model {d.path('models')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
