"""Every command README.md and docs/cluster.md show, run as written, in order, at a tiny size.

Each document's ```sh blocks run as one bash script (tests/docs_shell.py: real bash; stand-ins only
for what manages machines elsewhere: aws, ray up/dashboard/down, make). Their paths are the ones a
user has: README's run in a folder laid out as the demo corpus (`affectnet/training.csv` beside
`Manually_Annotated_Images/`, `fec/`, `recola/`, ...), its local jobs on the same head (RAY_ADDRESS
set, as where `ray start --head` runs: relative paths must still reach the workers), docs/cluster.md's upload local folders laid
out as the datasets' releases (AffectNet's `Manually_Annotated_file_lists/` and
`Manually_Annotated_Images/` side by side) to a local S3 (moto) and submit every job to a Ray head
started here (one GPU declared, none present). Only the dashboard's address is mapped (the docs'
8265 -> the head's port); the test adds the flags that size each job (docs_shell.TINY).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aver.io.parts import read_folder
from tests.docs_shell import prelude
from tests.media_fixtures import face_images, face_video
from tests.ray_helpers import ROOT
BUCKETS = ("aver-data", "aver-runs", "archive", "work", "media")
AFFECTNET_ROWS, FEC_TRIPLETS, UNLABELED = 16, 6, 8


def shell_blocks(doc: str) -> list[str]:
    """The ```sh blocks of ``doc``, in order. Every fence names its language, so no command can
    hide from this test in an untagged block."""
    blocks, lang, body = [], None, None
    for n, line in enumerate(open(os.path.join(ROOT, doc)).read().splitlines(), start=1):
        if not line.startswith("```"):
            if body is not None:
                body.append(line)
            continue
        if body is None:
            lang, body = line[3:].strip(), []
            assert lang, f"{doc}:{n}: a fenced block without a language (sh for commands, text, python)"
        else:
            if lang in ("sh", "bash", "shell"):
                blocks.append("\n".join(body))
            body = None
    return blocks


def test_docs_have_their_commands_in_sh_blocks():
    readme, cluster = shell_blocks("README.md"), shell_blocks("docs/cluster.md")
    assert any("train_teacher.py" in b for b in readme) and any("ray job submit" in b for b in readme)
    assert any("train_fusion.py" in b for b in cluster)
    assert any("aws s3 sync" in b for b in cluster) and any("evaluate.py" in b for b in cluster)


# -- the data, in the layouts the docs assume ---------------------------------------------------------

def _fec_over_http(corpus, out_dir, base_url):
    """The corpus's FEC CSVs with their images at ``base_url`` (as the real FEC's web URLs), first rows only."""
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "test"):
        name = f"faceexp-comparison-data-{split}-public.csv"
        with open(corpus / "fec" / name) as f, open(os.path.join(out_dir, name), "w", newline="") as g:
            for row in list(csv.reader(f))[:FEC_TRIPLETS]:
                for i in range(3):
                    row[5 * i] = base_url + "/" + os.path.basename(row[5 * i])
                csv.writer(g).writerow(row)


def _affectnet(corpus, lists_dir, images_dir):
    os.makedirs(lists_dir, exist_ok=True)
    for split in ("training", "validation"):
        with open(corpus / "affectnet" / f"{split}.csv") as f:
            rows = list(csv.reader(f))[:1 + AFFECTNET_ROWS]
        with open(os.path.join(lists_dir, f"{split}.csv"), "w", newline="") as g:
            csv.writer(g).writerows(rows)
        for row in rows[1:]:
            dst = os.path.join(images_dir, row[0])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(corpus / "affectnet" / "Manually_Annotated_Images" / row[0], dst)


def _weights(folder, names):
    """Upstream-layout state dicts of the three pretrained trunks (random values: nothing downloads)."""
    import torch

    from aver.models import IdentityNet, Student, VGGishEmotion

    os.makedirs(folder, exist_ok=True)
    facenet, densenet, vggish = names
    torch.save(IdentityNet().net.state_dict(), os.path.join(folder, facenet))  # the whole InceptionResnetV1
    torch.save(Student().backbone.state_dict(), os.path.join(folder, densenet))
    torch.save({f"features.{k}": v for k, v in VGGishEmotion().features.state_dict().items()},
               os.path.join(folder, vggish))


def _videos(folder):
    face_video(os.path.join(folder, "talk.mp4"), seconds=1.0)
    with open(os.path.join(folder, "broken.mp4"), "wb") as f:
        f.write(b"not a video")


@pytest.fixture(scope="module")
def fec_server(small_corpus):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(small_corpus / "fec" / "source")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def head(ray_head, s3):
    """The suite's Ray head (conftest), with the buckets the documents name on the local S3."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    for bucket in BUCKETS:
        client.create_bucket(Bucket=bucket)
    return ray_head


def start_doc(doc: str, cwd, env: dict, address: str) -> tuple[subprocess.Popen, str]:
    """``doc``'s sh blocks, in order, as one bash script in ``cwd`` (running; its output to a file)."""
    script = "\n".join(shell_blocks(doc))
    script = re.sub(r"http://(HEAD|127\.0\.0\.1):8265", address, script)  # the one mapped placeholder
    home = os.path.join(str(cwd), "home")
    os.makedirs(home, exist_ok=True)
    if not os.path.exists(os.path.join(home, "aver")):
        os.symlink(ROOT, os.path.join(home, "aver"))  # the nodes' checkout (~/aver)
    for name in ("jobs", "cluster.yaml"):  # the commands run from the checkout's root
        if not os.path.exists(os.path.join(str(cwd), name)):
            os.symlink(os.path.join(ROOT, name), os.path.join(str(cwd), name))
    run_env = dict(env, HOME=home, AVER_ROOT=ROOT, MPLCONFIGDIR=os.path.join(home, ".mpl"))
    log = os.path.join(str(cwd), "commands.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", prelude() + "\n" + script], cwd=str(cwd), env=run_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def finish_doc(doc: str, proc: subprocess.Popen, log_path: str, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    log = open(log_path).read()
    print(f"{doc}:\n" + "\n".join(line[:160] for line in log.splitlines() if line.startswith("+ [")))
    assert proc.returncode == 0, f"{doc}: a documented command failed (exit {proc.returncode}):\n{log[-6000:]}"
    return log


def _readme_workspace(ws, small_corpus, fec_server, random_models) -> None:
    """The repository root as README's commands assume it: the demo corpus's AffectNet layout
    (training.csv beside Manually_Annotated_Images/), FEC CSVs with web URLs, weights, media, the
    models make demo leaves, and the README's cluster example's videos on S3."""
    import fsspec

    _affectnet(small_corpus, ws / "affectnet", ws / "affectnet" / "Manually_Annotated_Images")
    _fec_over_http(small_corpus, ws / "fec", fec_server)
    _weights(ws / "weights", ("20180402-114759-vggface2.pt", "densenet201-c1103571.pth", "vggish-10086976.pth"))
    _videos(ws / "videos")
    face_video(ws / "archive" / "interview.mp4", seconds=2.0)  # a face and a tone; docs/cluster.md's is the 12-s interview
    (ws / "outputs" / "demo").mkdir(parents=True)
    (ws / "outputs" / "demo" / "models").symlink_to(random_models)
    fs = fsspec.filesystem("s3")
    for name in ("talk.mp4", "broken.mp4"):
        fs.put_file(str(ws / "videos" / name), f"archive/videos/{name}")


def _cluster_workspace(ws, small_corpus, fec_server) -> None:
    """A laptop with the datasets as their releases lay them out (AffectNet's file lists and images
    in sibling folders), the weights files docs/cluster.md uploads, and a media archive on S3."""
    import fsspec

    _affectnet(small_corpus, ws / "AffectNet" / "Manually_Annotated_file_lists",
               ws / "AffectNet" / "Manually_Annotated_Images")
    _fec_over_http(small_corpus, ws / "FEC", fec_server)
    shutil.copytree(small_corpus / "recola", ws / "RECOLA")
    face_images(ws / "powderfaces", UNLABELED)
    _weights(ws, ("vggface2.pt", "densenet201-c1103571.pth", "vggish-10086976.pth"))
    fsspec.filesystem("s3").put_file(str(small_corpus / "archive" / "interview.mp4"), "media/archive/interview.mp4")


@pytest.mark.timeout(1800)  # 462 s alone; 15 min was outlived on a loaded 2-CPU machine
def test_readme_and_cluster_md_commands_run_as_written(tmp_path, small_corpus, fec_server, head, random_models):
    # The two documents at once (independent users; the machine waits on Ray more than it computes).
    address, env, gcs = head
    readme, cluster = tmp_path / "repo", tmp_path / "laptop"
    _readme_workspace(readme, small_corpus, fec_server, random_models)
    _cluster_workspace(cluster, small_corpus, fec_server)
    # README's `python jobs/...` lines join the head (RAY_ADDRESS, as on a machine where `ray start
    # --head` runs) instead of starting a Ray each: their relative paths must reach the head's
    # workers, which run elsewhere. tests/test_console.py runs a job that starts its own Ray.
    running = {doc: start_doc(doc, cwd, dict(env, **extra), address)
               for doc, cwd, extra in (("README.md", readme, {"RAY_ADDRESS": gcs}), ("docs/cluster.md", cluster, {}))}
    logs = {doc: finish_doc(doc, proc, log, timeout=1700) for doc, (proc, log) in running.items()}
    readme_on_the_demo_layout(readme, logs["README.md"])
    cluster_md_on_the_release_layout(logs["docs/cluster.md"])


def readme_on_the_demo_layout(ws, log: str) -> None:
    from aver.models import load_checkpoint

    for d in (128, 256):  # the CLI's flags reached the model and its metrics
        model, _ = load_checkpoint(str(ws / "runs" / "models" / f"teacher{d}.pt"))
        assert model.config.d_face == d
        history = json.loads((ws / "runs" / "models" / f"teacher{d}.metrics.json").read_text())
        assert [h["epoch"] for h in history] == [0] and 0 <= history[0]["accuracy"] <= 1
    assert sorted(read_folder(str(ws / "runs" / "faces" / "status")).to_pandas()["status"]) == ["corrupt", "ok"]
    assert read_folder(str(ws / "runs" / "distill" / "targets")).num_rows == \
        read_folder(str(ws / "runs" / "faces" / "faces")).num_rows > 0
    assert read_folder(str(ws / "labels" / "scores")).num_rows > 0 and (ws / "labels" / "report" / "index.html").exists()
    assert log.count("face tracks link by motion only") == 1  # no --identity-model: said once
    # the submitted extract_faces: one status each on S3, its GPU share granted and the CPU taken
    status = read_folder("s3://work/faces/status").to_pandas()
    assert sorted(status["status"]) == ["corrupt", "ok"]
    assert "CUDA is not available: falling back to CPU" in log or "on CUDA (Ray GPU ids" in log


def cluster_md_on_the_release_layout(log: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    models = {os.path.basename(p) for p in fs.ls("aver-runs/models")}
    for name in ("teacher128.pt", "teacher256.pt", "student.pt", "vggish_arousal.pt", "vggish_valence.pt",
                 "fusion.pt", "fusion_visual.pt", "fusion_audio.pt"):
        assert name in models, (name, models, log[-3000:])
    # The student distilled: targets for every AffectNet row, FEC crop and unlabeled crop (each once;
    # the unlabeled crops packed into faces parts, whose targets the student read part by part),
    # and each of its losses reached it (RKD from the targets, triplets, AffectNet).
    targets = read_folder("s3://aver-runs/distill/targets").to_pandas()
    assert len(targets) == AFFECTNET_ROWS + 3 * FEC_TRIPLETS + UNLABELED and targets["crop_id"].is_unique
    assert read_folder("s3://aver-runs/unlabeled/faces")["crop"].null_count == 0
    assert "unlabeled s3://aver-runs/unlabeled: 1 faces parts, read packed" in log
    history = json.loads(fs.cat("aver-runs/models/student.metrics.json"))
    assert all(history[-1][k] > 0 for k in ("loss_rkd", "loss_fec", "loss_affectnet")), history
    # the three fusion variants featurise the training sessions once, the next two read the cache
    assert log.count("train sessions (faces at") == 1, log[-3000:]
    metrics = fs.cat("aver-runs/eval/metrics.json")
    assert b"affectnet_accuracy" in metrics and b"fused" in metrics
    assert fs.ls("media/labels/scores") and fs.exists("media/labels/report/index.html")
    assert fs.ls("media/labels/tracks") and "link by motion only" not in log  # the identity network ran
    for actor in ("SessionFeaturizer", "evaluate"):  # the featurisers' GPU share granted, the CPU taken
        assert f"{actor}: Ray GPU ids [0] but CUDA is not available: falling back to CPU" in log \
            or f"{actor}: on CUDA (Ray GPU ids [0])" in log, actor


def test_readme_lists_the_columns_of_every_output_folder():
    """README's table of output folders names each schema's columns (abbreviations spelled out)."""
    from aver.io.parts import STATUS_SCHEMA
    from aver.pipelines.distill import TARGETS_SCHEMA
    from aver.pipelines.extract import FACES_SCHEMA
    from aver.pipelines.report import SCORES_SCHEMA, SUMMARY_SCHEMA, TRACKS_SCHEMA
    from aver.pipelines.stages import clips_schema

    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("\nstatus/ "):text.index("```", text.index("\nstatus/ "))]
    folders = dict(re.findall(r"^(\w+)/\s+(.*?)(?=^\w+/|\Z)", table, flags=re.S | re.M))
    folders = {k: v.replace("arousal/valence mean and std", "arousal_mean valence_mean arousal_std valence_std")
               for k, v in folders.items()}
    for name, schema in (("status", STATUS_SCHEMA), ("faces", FACES_SCHEMA), ("targets", TARGETS_SCHEMA),
                         ("scores", SCORES_SCHEMA), ("tracks", TRACKS_SCHEMA), ("summary", SUMMARY_SCHEMA),
                         ("clips", clips_schema("video_id"))):
        words = set(re.findall(r"\w+", folders[name]))
        assert set(schema.names) <= words, (name, set(schema.names) - words)
