from dataclasses import dataclass

import pytest

from aver.pipelines.ledger import Unit
from aver.pipelines.stages import ActorPoolConfig, Record, model_pool


def test_actor_pool_config_validation():
    for bad in ({"actors": -1}, {"cpus_per_actor": 0.0}, {"gpus_per_actor": -0.5}, {"cpus_per_task": 0},
                {"io_threads": 0}, {"write_tasks": -1}, {"read_ahead": 0.0}, {"read_ahead": 1.5}):
        with pytest.raises(ValueError):
            ActorPoolConfig(**bad)


def test_model_pool_grows_with_the_cluster_and_is_capped_by_actors():
    # Guards against: a pool sized once from the cluster's CPUs (a GPU job at cold start got
    # CPUs - 1 CPU actors and never grew when GPU nodes joined).
    pool = model_pool(ActorPoolConfig(gpus_per_actor=0.5), n_units=1000)
    assert (pool.min_size, pool.max_size) == (1, 1000)  # no cap but the work: Ray Data grows it as room appears
    pool = model_pool(ActorPoolConfig(actors=3, gpus_per_actor=0.5), n_units=1000)
    assert (pool.min_size, pool.max_size) == (1, 3)  # --actors caps
    assert model_pool(ActorPoolConfig(actors=3), n_units=2).max_size == 2  # never more actors than units


def test_a_cpu_actor_is_sent_one_call_at_a_time_a_gpu_actor_the_next_one_ahead():
    # Guards against: a CPU actor holding a second call's records (720p frames) that it cannot start
    # before the first ends (bench (e): the 4x archive's peak grew with them); a GPU actor starved
    # between calls while it fetches the next one.
    assert model_pool(ActorPoolConfig(), n_units=10).max_tasks_in_flight_per_actor == 1
    gpu = model_pool(ActorPoolConfig(gpus_per_actor=0.5), n_units=10).max_tasks_in_flight_per_actor
    assert gpu is None or gpu >= 2  # None: Ray Data's default, two per actor call slot


def test_a_unit_that_breaks_a_shared_model_batch_fails_alone():
    # Guards against: one bad unit failing every unit gathered into the same model call.
    from aver.pipelines.stages import ModelStage, pack, unpack

    class Doubler(ModelStage):
        def run(self, records):
            if any(r.images < 0 for r in records):
                raise ValueError("negative input")
            for r in records:
                r.out = 2 * r.images

    records = [_Numbers(unit=Unit(f"u{i}", []), images=v) for i, v in enumerate((1, -1, 3))]
    records.append(Record(unit=Unit("u3", []), failure=("corrupt", "could not load")))
    out = unpack(Doubler()(pack(records)))
    assert [getattr(r, "out", None) for r in out] == [2, None, 6, None]
    assert out[1].failure[0] == "error" and "negative input" in out[1].failure[1]
    assert out[3].failure == ("corrupt", "could not load")  # a load failure passes through untouched
    assert all(getattr(r, "images", None) is None for r in out)  # the model inputs do not travel on


def test_only_cpu_model_actors_trim_the_heap_after_a_call(monkeypatch):
    # Guards against: a GPU actor walking its whole heap (malloc_trim) between GPU batches, when
    # what it holds of each batch is on the device; CPU actors must still trim (their activations).
    import torch

    from aver.pipelines import stages

    trims = []
    monkeypatch.setattr(stages, "trim_heap", lambda: trims.append(1))

    class Identity(stages.ModelStage):
        def __init__(self, device):
            self.device = torch.device(device)

        def run(self, records):
            pass

    batch = stages.pack([_Numbers(unit=Unit("u0", []), images=1)])
    Identity("cuda")(batch)  # a device that is named, not used: nothing here runs on it
    assert trims == []
    Identity("cpu")(batch)
    assert trims == [1]


def test_records_travel_with_their_arrays_out_of_band():
    # Guards against: a record's arrays copied out of the block when a stage reads it (a segment of
    # 32 720p frames is 110 MB: the model actor spent 2 CPU-s a minute of video copying them).
    import numpy as np

    from aver.pipelines.stages import pack, unpack

    grid = np.arange(24, dtype=np.float32).reshape(4, 6)
    records = [_Numbers(unit=Unit("u0", []), images=[grid, grid[:, ::2], np.zeros((0, 3))], payload=b"abc"),
               _Numbers(unit=Unit("u1", []), images=None, out=np.int64(7))]
    block = pack(records)
    assert block.num_rows == 2
    got = unpack(block)
    assert [g.unit.unit_id for g in got] == ["u0", "u1"] and got[0].payload == b"abc" and got[1].out == 7
    for a, b in zip(got[0].images, records[0].images):
        np.testing.assert_array_equal(a, b)
    memory = block["payload"].chunk(0).buffers()[2]
    at = got[0].images[0].__array_interface__["data"][0]
    assert memory.address <= at < memory.address + memory.size  # rebuilt in place, not copied


def _mapped_file(array) -> str:
    """The file mapped where ``array``'s memory lies ('' for anonymous memory: a heap copy)."""
    at = array.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= at < high:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


@dataclass(kw_only=True)
class _Numbers(Record):
    images: object = None
    out: object = None
    payload: bytes = b""


@dataclass(kw_only=True)
class _StagedConfig(ActorPoolConfig):
    output: str = ""


@pytest.mark.timeout(300)
def test_staged_commits_in_flight_are_capped_and_staging_is_empty_after(ray_local, tmp_path):
    # Guards against: every staged unit's commit submitted at once (a backlog queued in Ray, which
    # starts a worker process, torch and all, for each), and staging left behind by a finished run;
    # and records' arrays copied on their way into a model call (they are read in place).
    import time

    import numpy as np

    from aver.pipelines.stages import ModelStage, run_stages

    def load(unit, cfg):  # two segments (staged), with 2 MB of array each
        return iter([_Numbers(unit=unit, payload=b"x" * 100, images=np.full(2**19, 1.0, np.float32)),
                     _Numbers(unit=unit, images=np.full(2**19, 2.0, np.float32))])

    class WhereArrays(ModelStage):
        """Says where each record's array lies: read in place, it is in the object store's
        mapping; a copy (a block of two records sliced by Ray Data into a call) is on the heap."""
        consumed = ("images",)

        def __init__(self, cfg):
            pass

        def run(self, records):
            for r in records:
                r.out = (_mapped_file(r.images), float(r.images[0]))

    def commit(unit, records, cfg):
        start = time.time()
        read = list(records())
        assert [len(r.payload) for r in read] == [100, 0]  # the segments, in order, read back
        assert [r.out[1] for r in read] == [1.0, 2.0] and all("plasma" in r.out[0] for r in read), [r.out for r in read]
        time.sleep(0.4)
        (tmp_path / unit.unit_id).write_text(f"{start} {time.time()}")
        return [{"item_id": unit.unit_id, "status": "ok"}]

    units = [Unit(f"u{i}", [], False) for i in range(5)]
    # six commits would fit on the CPUs at once; the cap allows one
    cfg = _StagedConfig(actors=1, cpus_per_actor=0.5, cpus_per_task=0.25, write_tasks=1,
                        output=str(tmp_path / "out"))
    counts = {}
    for summary in run_stages(units, cfg, load=load, model=WhereArrays, commit=commit, id_column="item_id",
                              records_per_call=5):
        for k, v in summary.counts.items():
            counts[k] = counts.get(k, 0) + v
    assert counts == {"ok": 5}
    spans = sorted(tuple(map(float, (tmp_path / u.unit_id).read_text().split())) for u in units)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    assert not (tmp_path / "out" / "_staging").exists()  # every unit's segments removed after its commit


@pytest.mark.timeout(400)
def test_the_driver_receives_a_few_bytes_per_unit_whatever_its_length(ray_local, tmp_path):
    # Guards against: crops, frames or embeddings pulled through the driver (its memory and network
    # then grow with every video in flight). On the code before issue 25 (bef41fc) this measured
    # 57,689 B for a 2 s video, 228,742 B for 8 s and 49,389 B for the chunk of images (every crop
    # crossed the driver); after it, 209 B each.
    from PIL import Image

    from aver.faces import FaceDetectorConfig
    from aver.pipelines.extract import ExtractFacesConfig, run
    from tests.media_fixtures import face_patch, face_video
    from tests.ray_helpers import count_driver_bytes

    face_video(tmp_path / "short" / "v.mp4", seconds=2.0, audio=False)
    face_video(tmp_path / "long" / "v.mp4", seconds=8.0, audio=False)
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.fromarray(face_patch(128)).save(tmp_path / "images" / f"{i}.png")
    got = count_driver_bytes()
    per_unit = {}
    try:
        for name in ("short", "long", "images"):
            got.clear()
            cfg = ExtractFacesConfig(input=str(tmp_path / name), output=str(tmp_path / f"out-{name}"), actors=1,
                                     cpus_per_actor=0.5, records_per_call=2, detector=FaceDetectorConfig(batch_size=4))
            counts = run(cfg)
            assert counts == {"ok": 1 if name != "images" else 8}, counts
            per_unit[name] = sum(got)
    finally:
        count_driver_bytes(stop=True)
    # 2 s and 8 s at 5 fps in segments of 4 frames: 3 and 10 segments staged, one summary each
    assert max(per_unit.values()) < 4096, per_unit
    assert per_unit["long"] <= 1.1 * per_unit["short"], per_unit
