import pytest

from aver.pipelines.units import ActorPoolConfig, actor_count


def test_actor_pool_config_validation():
    for bad in ({"actors": -1}, {"cpus_per_actor": 0.0}, {"gpus_per_actor": -0.5}):
        with pytest.raises(ValueError):
            ActorPoolConfig(**bad)


def test_actor_count(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert actor_count(0, 1.0, 0.0, 100) == 7  # one CPU left for Ray Data's own tasks
    assert actor_count(0, 0.5, 0.0, 3) == 3  # never more actors than units
    assert actor_count(2, 1.0, 0.0, 100) == 2  # as asked
    assert actor_count(0, 1.0, 0.25, 100) == 7  # GPU shares asked, no GPU node yet: by the CPUs
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert actor_count(0, 1.0, 0.25, 100) == 8  # four per GPU
