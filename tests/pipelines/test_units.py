import pytest

from aver.pipelines.units import ActorPoolConfig, model_pool


def test_actor_pool_config_validation():
    for bad in ({"actors": -1}, {"cpus_per_actor": 0.0}, {"gpus_per_actor": -0.5}, {"cpus_per_task": 0},
                {"io_threads": 0}):
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
