"""`make bench-gpu` (jobs/bench_gpu.py) runs here as it would on the GPU machine, where Ray, s3fs and
moto are absent: at its CPU sizes, every figure line printed and written as it is measured."""

import os
import subprocess
import sys

import pytest

from tests.ray_helpers import ROOT, job_module

# What the GPU machine lacks and no wheel brings along: any import of these fails.
ABSENT = ("ray", "s3fs", "moto", "boto3", "botocore", "aiobotocore")
WITHOUT = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not on the GPU machine")
sys.meta_path.insert(0, Absent())
sys.argv = ["jobs/bench_gpu.py", *sys.argv[1:]]
runpy.run_path("jobs/bench_gpu.py", run_name="__main__")
"""
FIGURES = ("distill: bare teacher pair", "distill: GPU busy", "extract_faces: load stage",
           "extract_faces: model stage", "extract_faces: GPU busy", "extract_faces: MTCNN on", "score_videos: load stage",
           "score_videos: model stage", "score_videos: GPU busy", "bench-gpu: done")


@pytest.mark.timeout(300)
def test_bench_gpu_prints_every_figure_without_ray_or_s3fs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-c", WITHOUT, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = [line for line in r.stdout.splitlines() if line.startswith(FIGURES)]
    assert [next(f for f in FIGURES if line.startswith(f)) for line in printed] == list(FIGURES), r.stdout
    written = (tmp_path / "out" / "figures.txt").read_text().splitlines()
    assert written[1:] == printed  # each line as printed (after the run's header)
    for line in printed:
        if "GPU busy" not in line and "done" not in line:
            assert any(ch.isdigit() and ch != "0" for ch in line.split(":", 1)[1].split("(")[0]), line  # a rate > 0


def test_bench_keeps_the_gpu_figures_a_gpu_run_wrote(tmp_path):
    bench_gpu = job_module("bench_gpu")
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\n## (a) x\n\nfigures\n\n" + bench_gpu.gpu_section(str(report)) + "\n## How\n\nhow\n")
    assert "Still to be measured" in bench_gpu.gpu_section(str(report))
    figures = bench_gpu.Figures(str(tmp_path / "out"))
    figures.lines = ["distill: bare teacher pair 70,000 crops/s, model stage 60,000 crops/s"]
    bench_gpu.write_report(str(report), figures, "NVIDIA H200")
    text = report.read_text()
    assert text.count(bench_gpu.HEADING) == 1 and "## (a) x\n\nfigures" in text and text.endswith("## How\n\nhow\n")
    kept = bench_gpu.gpu_section(str(report))  # what `make bench` writes back
    assert "on NVIDIA H200" in kept and "60,000 crops/s" in kept and "make gpu-wheels" in kept
