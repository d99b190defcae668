import pytest
import torch
from torch import nn

from aver.training import TrainConfig, recalibrate_batchnorm


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


def test_train_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(output="o", name="a/b")
    with pytest.raises(ValueError):
        TrainConfig(output="o", name="x", epochs=0)


def test_require_batches_refuses_runs_without_a_step():
    from aver.training import require_batches

    cfg = TrainConfig(output="o", name="x", batch_size=8, num_workers=2)
    require_batches(16, cfg, "windows")
    with pytest.raises(ValueError, match="15 windows cannot fill one batch of 8 on each of 2 workers"):
        require_batches(15, cfg, "windows")
