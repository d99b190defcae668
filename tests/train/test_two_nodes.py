"""Training on a real two-node Ray cluster on this machine: a head without CPUs (the driver and Ray
Train's controller) and a worker node where the training worker and its data tasks run; the data,
the checkpoints and the model on a local S3 (moto). The worker node's raylet is killed mid-run and a
new node joins: Ray Train restarts the worker there from the last checkpoint on S3, and the run ends
with the model an uninterrupted run trains."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from aver.models import load_checkpoint
from tests.media_fixtures import corpus_subset
from tests.pipelines.test_two_nodes import TwoNodes, _finish


@pytest.fixture()
def s3_corpus(s3, small_corpus, tmp_path):
    """The face-training tests' corpus subset on S3: manifests and their images."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3["options"])
    data = corpus_subset(small_corpus, tmp_path / "data", affectnet_rows=32, fec_triplets=16)
    root = f"s3://{s3['bucket']}/train-two-nodes"
    fs.put(data["affectnet"], f"{root}/affectnet/training.csv")
    fs.put(data["fec"], f"{root}/fec/faceexp-comparison-data-train-public.csv")
    for folder, local in (("affectnet/images", data["affectnet_images"]),
                          ("fec/images", os.path.join(small_corpus, "fec", "images"))):
        files = sorted(glob.glob(os.path.join(local, "**", "*.*"), recursive=True))
        fs.put(files, [f"{root}/{folder}/{os.path.relpath(f, local)}" for f in files])
    return {"root": root, "so": s3["options"], "fs": fs}


def _args(inp, output: str) -> list[str]:
    r = inp["root"]
    return ["jobs/train_teacher.py", "--affectnet", f"{r}/affectnet/training.csv", "--affectnet-images",
            f"{r}/affectnet/images", "--fec", f"{r}/fec/faceexp-comparison-data-train-public.csv", "--fec-images",
            f"{r}/fec/images", "--output", output, "--storage-options", json.dumps(inp["so"]), "--epochs", "4",
            "--batch-size", "8", "--freeze", "trunk", "--cpus-per-worker", "1", "--max-failures", "2"]


@pytest.mark.timeout(900)
def test_worker_node_killed_mid_run_resumes_from_s3_to_the_uninterrupted_model(s3_corpus):
    inp, fs = s3_corpus, s3_corpus["fs"]
    nodes = TwoNodes(head_cpus=0)  # nothing but the driver and the controller can run on the head
    try:
        nodes.add_gpu_node(cpus=2)
        clean = f"{inp['root']}/clean"
        rc, log = _finish(nodes.run_job(_args(inp, clean)), timeout=400)
        assert rc == 0, log[-4000:]
        for attempt in range(3):  # the kill must land while epochs remain (a few seconds each)
            killed = f"{inp['root']}/killed-{attempt}"
            job = nodes.run_job(_args(inp, killed))
            deadline = time.time() + 300
            while time.time() < deadline and job.poll() is None and not fs.glob(f"{killed}/runs/teacher128/checkpoint_*"):
                time.sleep(0.2)
                fs.invalidate_cache()
            nodes.kill_gpu_raylet()  # the worker node lost after the first epoch's checkpoint reached S3
            nodes.add_gpu_node(cpus=2)
            rc, log = _finish(job, timeout=400)
            assert rc == 0, log[-4000:]
            if "resumed from the checkpoint of epoch" in log:
                break
        else:
            pytest.fail("the kill never landed while the run was training")
        a, meta_a = load_checkpoint(f"{clean}/models/teacher128.pt", storage_options=inp["so"])
        b, meta_b = load_checkpoint(f"{killed}/models/teacher128.pt", storage_options=inp["so"])
        assert [h["epoch"] for h in json.loads(meta_b["history"])] == list(range(4))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
        assert worst <= 1e-4, f"resumed model differs from the uninterrupted one by {worst}"
    finally:
        nodes.shutdown()
