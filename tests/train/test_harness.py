from dataclasses import dataclass

import pytest
import torch
from torch import nn

from aver.data.prefix_store import PrefixStore
from aver.train.batches import recalibrate_batchnorm
from aver.train.harness import TrainConfig, epochs


def test_recalibrate_batchnorm_uses_exact_averages_of_trainable_layers():
    torch.manual_seed(0)
    frozen = nn.BatchNorm1d(4)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.eval()
    data = [torch.randn(16, 4) * 3 + 5 for _ in range(3)]
    recalibrate_batchnorm(model, iter(data))
    with torch.no_grad():
        z = torch.cat([model[1](model[0](x)) for x in data])
    assert torch.allclose(model[2].running_mean, z.mean(0), atol=1e-5)
    assert torch.allclose(frozen.running_mean, torch.zeros(4))  # frozen statistics untouched
    assert not model[2].training and model[2].momentum == 0.1


@dataclass
class _Heads(TrainConfig):
    """Two-layer regressors of different widths: 'ab' trains a and b side by side, 'b' b alone."""

    def default_variants(self) -> dict:
        return {"a": 3, "b": 4} if self.name == "ab" else {"b": 4}

    def build_model(self, variant=None, pretrained=True):
        return nn.Sequential(nn.Linear(5, variant), nn.Tanh(), nn.Linear(variant, 2))


class _Rank0:
    def get_world_rank(self):
        return 0


def test_variants_side_by_side_train_as_each_would_alone(tmp_path, monkeypatch):
    # Guards against: variants that are not each other's equals in one run (built one after another
    # from one seed, so the second starts from other weights; a coupled loss or step), which would
    # make a run of both teachers differ from two runs of one.
    import ray.train

    from aver.train.harness import build_variants, ccc_epoch, variant_history

    monkeypatch.setattr(ray.train, "get_context", lambda: _Rank0())
    torch.manual_seed(1)
    data = [(torch.randn(8, 5), torch.randn(8, 2)) for _ in range(5)]
    trained = {}
    for name in ("ab", "b"):
        cfg = _Heads(output=str(tmp_path), name=name, epochs=1, seed=3)
        model = build_variants(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
        results = ccc_epoch(model, opt, data, lambda b: {n: (o, b[1]) for n, o in model(model.same(b[0])).items()},
                            cfg, 0)
        trained[name] = (model.named()["b"].state_dict(), results["b"][0])
    (together, loss_together), (alone, loss_alone) = trained["ab"], trained["b"]
    assert abs(loss_together - loss_alone) < 1e-6
    assert all(torch.allclose(together[k], alone[k], atol=1e-6) for k in alone)
    history = [{"epoch": 0, "steps": 5, "a/loss": 0.5, "b/loss": 0.25}]
    assert variant_history(history, "b") == [{"epoch": 0, "steps": 5, "loss": 0.25}]


def test_variants_on_a_frozen_prefix_must_share_it(tmp_path):
    # the prefix's outputs are cached once for every variant: two different trunks cannot share it
    from aver.models import Teacher
    from aver.train.face import TeacherTrainConfig
    from aver.train.harness import build_variants

    cfg = TeacherTrainConfig(output=str(tmp_path), affectnet="a.csv", fec="f.csv", d_face=(8, 16), freeze="trunk")
    model = build_variants(cfg, freeze="trunk")  # random trunks from the same seed: equal
    assert [m.config.d_face for m in model.values()] == [8, 16] and model.names == ["teacher8", "teacher16"]

    def other_trunk(variant=None, pretrained=True):
        m = Teacher(d_face=variant)
        if variant == 16:
            with torch.no_grad():
                next(m.trunk.parameters()).add_(1.0)
        return m

    cfg.build_model = other_trunk
    with pytest.raises(ValueError, match="same trunk weights"):
        build_variants(cfg, freeze="trunk")


def test_train_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(output="o", name="a/b")
    with pytest.raises(ValueError):
        TrainConfig(output="o", name="x", epochs=0)


def test_relative_local_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    # Guards against: a job on a running cluster (RAY_ADDRESS) handing its workers paths relative
    # to the driver's folder; they run in another (tests/test_docs.py runs README's jobs that way).
    from aver.pipelines.distill import DistillConfig
    from aver.pipelines.evaluate import EvaluateConfig
    from aver.pipelines.score import ScoreVideosConfig
    from aver.train.face import StudentTrainConfig
    from aver.train.fusion import FusionTrainConfig

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    student = StudentTrainConfig(output="runs/", affectnet="affectnet/training.csv", fec="s3://b/fec.csv",
                                 targets="runs/distill", imagenet="densenet201")
    assert (student.output, student.affectnet, student.fec, student.targets, student.imagenet) == \
        (f"{here}/runs", f"{here}/affectnet/training.csv", "s3://b/fec.csv", f"{here}/runs/distill", "densenet201")
    fusion = FusionTrainConfig(output="r", recola="recola", student="m/student.pt", vggish_arousal="m/a.pt",
                               vggish_valence="s3://b/v.pt")
    assert (fusion.recola, fusion.student, fusion.vggish_valence) == (f"{here}/recola", f"{here}/m/student.pt",
                                                                      "s3://b/v.pt")
    distill = DistillConfig(input=("faces", "s3://b/x.csv"), teachers=("t1.pt", "t2.pt"), output="out")
    assert (distill.input, distill.teachers, distill.output) == \
        ((f"{here}/faces", "s3://b/x.csv"), (f"{here}/t1.pt", f"{here}/t2.pt"), f"{here}/out")
    score = ScoreVideosConfig(input="videos/", output="labels", model="models")
    assert (score.input, score.output, score.model) == (f"{here}/videos", f"{here}/labels", f"{here}/models")
    evaluate = EvaluateConfig(models="models", data="s3://b/data", output="eval")
    assert (evaluate.models, evaluate.data, evaluate.output) == (f"{here}/models", "s3://b/data", f"{here}/eval")


def test_epochs_set_the_learning_rate_of_each_epoch_and_resume_mid_schedule():
    import math

    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(output="o", name="n", lr_schedule="step")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    seen = lambda cfg, start: [(e, opt.param_groups[0]["lr"]) for e in epochs(cfg, start, opt)]  # noqa: E731
    assert seen(TrainConfig(output="o", name="n", epochs=3, lr=0.1), 0) == [(0, 0.1), (1, 0.1), (2, 0.1)]
    cosine = TrainConfig(output="o", name="n", epochs=4, lr=0.1, lr_schedule="cosine")
    full = seen(cosine, 0)
    assert [e for e, _ in full] == [0, 1, 2, 3]
    assert [lr for _, lr in full] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    assert full[-1][1] > 0  # the last epoch still learns
    assert seen(cosine, 2) == full[2:]  # a resumed run continues the schedule


def test_require_batches_refuses_runs_without_a_step():
    from aver.train.harness import require_batches

    cfg = TrainConfig(output="o", name="x", batch_size=8, num_workers=2)
    require_batches(16, cfg, "windows")
    with pytest.raises(ValueError, match="15 windows cannot fill one batch of 8 on each of 2 workers"):
        require_batches(15, cfg, "windows")


def test_prefix_store_shares_outputs_between_runs_by_image_content(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    calls = []

    def encode(x):
        calls.append(len(x))
        return torch.as_tensor(x).float().permute(0, 3, 1, 2) / 255  # stands in for a frozen prefix

    first = PrefixStore(str(tmp_path / "p"), "run1")
    out = first.encode(images[:3], encode)
    assert calls == [3] and out.dtype == torch.float16 and out.shape == (3, 3, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as the models run
    assert torch.allclose(out.float(), encode(images[:3]), atol=1e-3)
    calls.clear()
    first.save()
    first.save()  # nothing new: no empty part
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["run1-0.keys.npy", "run1-0.npy"]
    second = PrefixStore(str(tmp_path / "p"), "run2")
    changed = images.copy()
    changed[1, 0, 0, 0] ^= 1  # a changed image is a miss, never a stale hit
    again = second.encode(np.concatenate([images[:3], changed[1:2], images[3:]]), encode)
    assert calls == [3]  # only the changed image and the two new ones were computed
    assert torch.equal(again[:3], out)
    second.save()
    assert len(PrefixStore(str(tmp_path / "p"), "run3")) == 6
    (tmp_path / "p" / "run2-0.keys.npy").unlink()  # a part whose keys were never written is not there
    third = PrefixStore(str(tmp_path / "p"), "run3")
    assert len(third) == 3 and torch.equal(third.encode(images[:3], encode), out) and calls == [3]


def test_prefix_store_reads_the_rows_asked_for_not_the_whole_store(tmp_path):
    # Guards against: every worker loading every part of every run (memory growing with the corpus
    # and the number of runs instead of with the worker's own rows).
    import tracemalloc

    import numpy as np

    images = np.zeros((300, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(300) % 256, np.arange(300) // 256

    def encode(x):  # 64 KiB per row (a prefix output is tens of KiB): the image's number everywhere
        n = torch.as_tensor(x[:, 0, 0, 0]).float() + 256 * torch.as_tensor(x[:, 0, 0, 1]).float()
        return n.reshape(-1, 1, 1).expand(-1, 32, 1024).clone()

    writer = PrefixStore(str(tmp_path / "p"), "run1", part_rows=64)
    for s in range(0, 300, 50):
        writer.encode(images[s:s + 50], encode)
    writer.save()
    assert len(list((tmp_path / "p").glob("*.keys.npy"))) == 3  # saved on its own once 64 rows were new
    tracemalloc.start()
    reader = PrefixStore(str(tmp_path / "p"), "run2")
    got = reader.encode(images[[7, 250]], lambda x: pytest.fail("stored rows must not be recomputed"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got[:, 0, 0].tolist() == [7, 250] and len(reader) == 300
    assert peak < 1_000_000  # the store holds 300 x 64 KiB = 19 MiB


def test_restore_continues_from_the_saved_model_optimizer_epoch_and_history(tmp_path, monkeypatch):
    # Guards against: restore ignoring the checkpoint Ray offers after a failure (training again
    # from epoch 0 with fresh weights and optimizer moments).
    import ray.train

    from aver.train.harness import report_epoch, restore

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = {}

    class Context:
        def get_world_rank(self):
            return 0

    def report(metrics, checkpoint=None):
        saved["dir"] = checkpoint.to_directory(str(tmp_path / "ckpt"))

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train, "report", report)
    history = report_epoch(3, {"x": {"loss": 0.5}}, model, opt, [{"epoch": 2, "x/loss": 0.7}],
                           TrainConfig(output=str(tmp_path), name="x", epochs=4))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(saved["dir"]))
    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    start, restored = restore(fresh, fresh_opt)
    assert start == 4 and restored == history and history[0] == {"epoch": 2, "x/loss": 0.7}
    assert {k: history[1][k] for k in ("epoch", "x/loss", "lr")} == {"epoch": 3, "x/loss": 0.5, "lr": 0.1}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    moments = [s["exp_avg"] for s in opt.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, fresh_opt.state_dict()["state"].values()))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    assert restore(nn.Linear(3, 2), None) == (0, [])  # a first run starts at epoch 0


def _read_events(path) -> list:
    """TensorBoard's records of ``path``, each checked against its CRCs, parsed as Events."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, at = open(path, "rb").read(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(header)
        body = data[at + 12:at + 12 + n]
        assert struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == masked_crc32c(body)
        events.append(Event.FromString(body))
        at += 16 + n
    return events


def test_tensorboard_curves_hold_every_epoch_once_across_a_resume(tmp_path, monkeypatch):
    # Guards against: curves that restart or repeat epochs after a resume (an event file appended
    # to by each attempt), and metrics, the learning rate or the step count missing from them.
    import ray.train

    from aver.train.harness import EVENTS_FILE, report_epoch, restore

    saved = {}
    monkeypatch.setattr(ray.train, "get_context", lambda: _Rank0())
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: saved.update(
        dir=checkpoint.to_directory(str(tmp_path / f"ckpt{metrics['epoch']}"))))
    cfg = TrainConfig(output=str(tmp_path), name="ab", epochs=3)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    history = []
    for epoch in range(2):
        history = report_epoch(epoch, {"a": {"loss": 1.0 - epoch / 4}, "b": {"loss": 2.0 - epoch}}, model, opt,
                               history, cfg, shared={"steps": 5})
    events_path = tmp_path / "runs" / "ab" / EVENTS_FILE
    before = events_path.read_bytes()
    # the run fails in epoch 2 and resumes from the checkpoint of epoch 1
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(saved["dir"]))
    start, history = restore(nn.Linear(3, 2), None)
    opt.param_groups[0]["lr"] = 0.05
    report_epoch(start, {"a": {"loss": 0.5}, "b": {"loss": 0.25}}, model, opt, history, cfg, shared={"steps": 5})
    after = events_path.read_bytes()
    assert after.startswith(before)  # TensorBoard, reading on from where it stopped, sees epoch 2 appended
    events = _read_events(events_path)
    assert events[0].file_version == "brain.Event:2"
    curves = {}
    for e in events[1:]:
        for v in e.summary.value:
            curves.setdefault(v.tag, []).append((e.step, round(v.simple_value, 6)))
    assert curves == {"steps": [(0, 5.0), (1, 5.0), (2, 5.0)], "lr": [(0, 0.1), (1, 0.1), (2, 0.05)],
                      "a/loss": [(0, 1.0), (1, 0.75), (2, 0.5)], "b/loss": [(0, 2.0), (1, 1.0), (2, 0.25)]}


def test_an_epochs_progress_line_every_30_s_from_rank_0(tmp_path, monkeypatch, capsys):
    # on a fake clock: no line before 30 s, then the steps done of the total, the rate and the time left
    import ray.train

    import aver.console
    from aver.train.harness import step_progress

    now = [100.0]
    monkeypatch.setattr(aver.console.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(ray.train, "get_context", lambda: _Rank0())
    cfg = TrainConfig(output=str(tmp_path), name="teacher128+teacher256", epochs=20)
    progress = step_progress(cfg, 2, 400)
    for _ in range(10):
        now[0] += 2.0
        progress.update()
    assert capsys.readouterr().out == ""  # 20 s in
    for _ in range(6):
        now[0] += 2.0
        progress.update()
    assert capsys.readouterr().out.splitlines() == [
        "teacher128+teacher256 epoch 3/20: 15/400 steps (4 %), 0.5/s, ETA 12m50s"]
    class Rank1:
        def get_world_rank(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Rank1())
    other = step_progress(cfg, 2, 400)
    now[0] += 3600
    other.update()
    assert capsys.readouterr().out == ""  # only rank 0 speaks


def test_begin_ships_registry_weights_to_the_runs_storage(s3, tmp_path, monkeypatch):
    # Guards against: training workers on other nodes resolving a registry name in their own
    # weights folder (empty there): the driver resolves it and the workers read OUTPUT/weights.
    from aver.models.weights import WEIGHTS
    from aver.train.face import TeacherTrainConfig
    from aver.train.harness import begin

    monkeypatch.setenv("AVER_WEIGHTS_DIR", str(tmp_path))
    torch.save({"w": torch.zeros(1)}, tmp_path / WEIGHTS["facenet-vggface2"].filename)
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # begin() joins no Ray here
    out = f"s3://{s3['bucket']}/begin"
    cfg = TeacherTrainConfig(output=out, affectnet="a.csv", fec="f.csv", facenet="facenet-vggface2",
                             storage_options=s3["options"])
    assert begin(cfg, "train_teacher")
    assert cfg.facenet == f"{out}/weights/{WEIGHTS['facenet-vggface2'].filename}"


def _ddp_worker(rank: int, port: int, grad_comm: str, use_gpu: bool, out: str) -> None:
    import os

    import torch.distributed as dist

    from aver.models import FusionModel
    from aver.train.harness import compress_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(FusionModel(32, 16))
    compress_gradients(model, TrainConfig(output="o", name="x", grad_comm=grad_comm, use_gpu=use_gpu))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1 + rank)  # each worker its own batch
    losses, grads = [], None
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(4, 20, 32), torch.randn(4, 12, 16)).pow(2).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()]) if grads is None else grads  # step 1's
        opt.step()
        losses.append(loss.item())
    torch.save({"hook": model._get_ddp_logging_data().get("comm_hook"), "grads": grads, "losses": losses,
                "weights": [p.detach().clone() for p in model.parameters()]}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_gradients_all_reduced_in_bf16_when_asked(tmp_path):
    # Guards against: the bf16 comm hook never registered (or registered on CPU runs by default),
    # and a hook that lets the workers' weights drift apart.
    import socket

    import torch.multiprocessing as mp

    runs = {}
    for grad_comm, use_gpu in (("bf16", False), ("auto", False)):
        out = tmp_path / grad_comm
        out.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_worker, args=(port, grad_comm, use_gpu, str(out)), nprocs=2)
        runs[grad_comm] = [torch.load(out / f"{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["hook"] for r in runs["bf16"]] == ["bf16_compress_hook"] * 2
    assert runs["auto"][0]["hook"] is None  # on CPUs, "auto" sends the gradients as computed
    a, b = runs["bf16"]
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))  # the workers stay one model
    exact = runs["auto"][0]["grads"]
    assert not torch.equal(a["grads"], exact)  # the sum really went through bf16 ...
    assert torch.allclose(a["grads"], exact, rtol=2e-2, atol=1e-4)  # ... to bf16's precision
    assert TrainConfig(output="o", name="x", use_gpu=True).bf16_gradients  # "auto" on GPUs
