import os

import pytest

from aver.demo.s3proxy import local_s3


@pytest.fixture(scope="session")
def s3():
    """A local S3 (moto_server on 127.0.0.1) with one bucket; yields fsspec storage options."""
    with local_s3("aver-test") as store:
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL=store["endpoint"])
        yield store
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the in-process job tests (2 CPUs, no dashboard)."""
    import ray

    from aver.pipelines.units import keep_task_workers

    keep_task_workers()  # the local Ray a job starts
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ours = _ray_processes()
    ray.shutdown()
    # A Ray Train controller still winding down when its raylet goes was seen to outlive it (an
    # orphan of init): end what is left of this Ray, and only of it.
    import psutil

    _, alive = psutil.wait_procs(ours, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _ray_processes() -> list:
    """The processes of the Ray this test session started (its GCS, raylet and their workers)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") or any(k in cmd for k in ("raylet", "gcs_server", "ray/_private", "ray/dashboard")):
            found.append(p)
    return found


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
