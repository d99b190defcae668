import os
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A local S3 (moto_server on 127.0.0.1) with one bucket; yields fsspec storage options."""
    port = _free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="aver-test")
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL=endpoint)
    yield {"options": options, "endpoint": endpoint, "bucket": "aver-test"}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the in-process job tests (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The demo corpus at size 'small' (seed 7) with its FEC images fetched, shared by the suite."""
    from aver.pipelines.fetch import FetchConfig, run as fetch
    from aver.demo.corpus import write_corpus

    root = tmp_path_factory.mktemp("small_corpus")
    write_corpus(str(root), seed=7, size="small")
    for split in ("train", "test"):
        fetch(FetchConfig(manifest=str(root / "fec" / f"faceexp-comparison-data-{split}-public.csv"),
                          output=str(root / "fec"), allow_file_urls=True))
    return root


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """A --model folder of untrained checkpoints (student, both VGGish, the three fusion variants):
    the scoring path's shapes, flags and bookkeeping do not depend on trained weights."""
    import torch

    from aver.models import FusionModel, Student, VGGishEmotion, save_checkpoint

    root = tmp_path_factory.mktemp("random_models")
    torch.manual_seed(0)
    save_checkpoint(Student().eval(), str(root / "student.pt"))
    for dim in ("arousal", "valence"):
        save_checkpoint(VGGishEmotion().eval(), str(root / f"vggish_{dim}.pt"))
    for name, modalities in (("fusion", ("visual", "audio")), ("fusion_visual", ("visual",)),
                             ("fusion_audio", ("audio",))):
        save_checkpoint(FusionModel(1920, 256, modalities=modalities).eval(), str(root / f"{name}.pt"))
    return root
