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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo", help="demo folder (default outputs/demo)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--size", default="medium", choices=["small", "medium"], help="corpus size (default medium)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every stage's epochs (default 1)")
    a = p.parse_args(argv)

    import ray

    from aver.pipelines.distill import DistillConfig
    from aver.pipelines.distill import run as distill
    from aver.pipelines.evaluate import EvaluateConfig
    from aver.pipelines.evaluate import run as evaluate
    from aver.pipelines.fetch import FetchConfig
    from aver.pipelines.fetch import run as fetch
    from aver.losses import FaceLossConfig
    from aver.pipelines.score import ScoreVideosConfig
    from aver.pipelines.score import run as score
    from aver.demo.corpus import write_corpus
    from aver.train.fusion import FusionTrainConfig
    from aver.train.fusion import run as train_fusion
    from aver.train.student import StudentTrainConfig
    from aver.train.student import run as train_student
    from aver.train.teacher import TeacherTrainConfig
    from aver.train.teacher import run as train_teacher
    from aver.train.vggish import VGGishTrainConfig
    from aver.train.vggish import run as train_vggish

    out = os.path.abspath(a.output)
    corpus, models = os.path.join(out, "corpus"), os.path.join(out, "models")
    started = time.time()

    def stage(name: str) -> None:
        print(f"\n=== [{time.time() - started:6.0f} s] {name}", flush=True)

    ep = lambda n: max(1, round(n * a.epochs_scale))  # noqa: E731
    cpus = float(os.cpu_count() or 1)
    # One worker per stage reserving 1 CPU (Ray Data feeds it from the rest); it still runs torch
    # on every core (threads_per_worker=0). Single-actor stages reserve every CPU.
    common = {"output": out, "cpus_per_worker": 1.0}
    stage("corpus")
    if not os.path.exists(os.path.join(corpus, "recola")):
        print(write_corpus(corpus, seed=a.seed, size=a.size))
    for split in ("train", "test"):
        fetch(FetchConfig(manifest=os.path.join(corpus, "fec", f"faceexp-comparison-data-{split}-public.csv"),
                          output=os.path.join(corpus, "fec"), allow_file_urls=True))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)  # workers' per-epoch lines show here
    aff = os.path.join(corpus, "affectnet", "training.csv")
    aff_images = os.path.join(corpus, "affectnet", "Manually_Annotated_Images")
    fec = os.path.join(corpus, "fec", "faceexp-comparison-data-train-public.csv")
    teachers = []
    for d in (128, 256):
        stage(f"teacher d_face={d} (random FaceNet trunk, frozen; same trunk for both, as in the paper)")
        cfg = TeacherTrainConfig(**common, name=f"teacher{d}", epochs=ep(14), batch_size=32, lr=2e-3,
                                 lr_schedule="cosine", affectnet=aff, affectnet_images=aff_images, fec=fec, d_face=d,
                                 freeze="trunk", seed=a.seed)
        train_teacher(cfg)
        teachers.append(cfg.model_uri)
    stage("distill")
    for source, root in ((aff, aff_images), (fec, None), (os.path.join(corpus, "unlabeled"), None)):
        distill(DistillConfig(input=source, images_root=root, teachers=tuple(teachers),
                              output=os.path.join(out, "distill"), batch_size=64, actors=1, cpus_per_actor=cpus))
    for name, targets in (("student", os.path.join(out, "distill")), ("student_nodistill", None)):
        stage(f"{name} (random DenseNet201, frozen up to transition3)")
        train_student(StudentTrainConfig(
            **common, name=name, epochs=ep(5), batch_size=32, lr=1e-3, lr_schedule="cosine", affectnet=aff,
            affectnet_images=aff_images, fec=fec, targets=targets,
            unlabeled=os.path.join(corpus, "unlabeled") if targets else None, freeze="transition3",
            loss=FaceLossConfig(rkd_distance_weight=5.0, rkd_angle_weight=10.0), seed=a.seed))
    recola = os.path.join(corpus, "recola")
    for dim in ("arousal", "valence"):
        stage(f"VGGish {dim} (random conv stack, frozen; FC layers train)")
        train_vggish(VGGishTrainConfig(**common, name=f"vggish_{dim}", recola=recola, dimension=dim, epochs=ep(8),
                                       batch_size=16, lr=1e-4, segment_frames=96, hop_frames=20, freeze="features",
                                       seed=a.seed))
    for name, modalities in (("fusion", ("visual", "audio")), ("fusion_visual", ("visual",)),
                             ("fusion_audio", ("audio",))):
        stage(name)
        train_fusion(FusionTrainConfig(
            **common, name=name, recola=recola, student=os.path.join(models, "student.pt"),
            vggish_arousal=os.path.join(models, "vggish_arousal.pt"),
            vggish_valence=os.path.join(models, "vggish_valence.pt"), modalities=modalities, epochs=ep(10),
            batch_size=16, lr=1e-3, window_s=9.6, hop_s=0.4, featurizer_cpus=cpus, seed=a.seed))
    stage("evaluate")
    evaluate(EvaluateConfig(models=models, data=corpus, output=os.path.join(out, "eval"), prefix_cache=out,
                            featurizer_cpus=cpus))
    stage("score_videos on the demo archive (speech + face, face only, audio only, no face, broken)")
    score(ScoreVideosConfig(input=os.path.join(corpus, "archive"), output=os.path.join(out, "scores"), model=models,
                            actors=1, cpus_per_actor=cpus))
    print(f"\ndemo finished in {time.time() - started:.0f} s; models in {models}, metrics in "
          f"{os.path.join(out, 'eval', 'metrics.json')}\nreport: file://{os.path.join(out, 'scores', 'report', 'index.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
