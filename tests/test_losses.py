import itertools

import numpy as np
import pytest
import torch

from aver.losses import FaceLossConfig, ccc_loss, fec_triplet_loss, rkd_loss


def _unit(v):
    return v / np.linalg.norm(v)


def test_fec_triplet_loss_matches_per_triplet_formula():
    g = torch.Generator().manual_seed(0)
    e = [torch.randn(6, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    margins = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.1, 0.2], dtype=torch.float64)
    got = fec_triplet_loss(*e, margins)
    expected = 0.0
    for b in range(6):
        i, j, k = (_unit(x[b].numpy()) for x in e)
        d = lambda p, q: float(((p - q) ** 2).sum())  # noqa: E731
        m = float(margins[b])
        expected += max(0.0, m + d(i, j) - d(i, k)) + max(0.0, m + d(i, j) - d(j, k))
    assert got.item() == pytest.approx(expected / 6, rel=1e-5)
    # A float margin equals a constant per-triplet one.
    assert fec_triplet_loss(*e, 0.2).item() == pytest.approx(fec_triplet_loss(*e, torch.full((6,), 0.2)).item())


def test_fec_triplet_loss_zero_when_pair_is_far_closer_and_grads_flow():
    i = torch.tensor([[1.0, 0.0, 0.0]])
    j = torch.tensor([[0.99, 0.01, 0.0]])
    k = torch.tensor([[-1.0, 0.0, 0.0]])
    assert fec_triplet_loss(i, j, k, 0.2).item() == 0.0
    e = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    fec_triplet_loss(*e, 1.0).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in e)


def test_margins_from_triplet_types():
    cfg = FaceLossConfig()
    assert cfg.margins(torch.tensor([0, 1, 2])).tolist() == pytest.approx([0.1, 0.1, 0.2])
    with pytest.raises(ValueError):
        FaceLossConfig(margin_one_class=-1)


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_reference(s, t, wd, wa):
    n = s.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    ds, dt = ds / ds.mean(), dt / dt.mean()
    dist = np.mean([_huber(a, b) for a, b in zip(ds, dt)])
    angle_terms = []
    for j, i, k in itertools.product(range(n), repeat=3):
        if i == j or k == j:
            continue
        cs = _unit(s[i] - s[j]) @ _unit(s[k] - s[j])
        ct = _unit(t[i] - t[j]) @ _unit(t[k] - t[j])
        angle_terms.append(_huber(cs, ct))
    return wd * dist + wa * np.mean(angle_terms)


def test_rkd_loss_matches_explicit_distance_and_angle_terms():
    rng = np.random.default_rng(3)
    s, t = rng.standard_normal((5, 7)), rng.standard_normal((5, 80))
    got = rkd_loss(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(_rkd_reference(s, t, 1.0, 2.0), rel=1e-5)
    only_angle = rkd_loss(torch.tensor(s), torch.tensor(t), distance_weight=0.0, angle_weight=1.0)
    assert only_angle.item() == pytest.approx(_rkd_reference(s, t, 0.0, 1.0), rel=1e-5)


def test_rkd_loss_is_zero_for_similar_geometry_and_grads_flow():
    t = torch.randn(6, 80)
    q, _ = torch.linalg.qr(torch.randn(80, 80))
    # Rotated and scaled teacher points have the same relations: the loss vanishes.
    assert rkd_loss(3.0 * t @ q, t).item() < 1e-6
    s = torch.randn(6, 80, requires_grad=True)
    teacher = torch.randn(6, 80, requires_grad=True)
    rkd_loss(s, teacher).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert teacher.grad is None  # targets are constants
    with pytest.raises(ValueError):
        rkd_loss(torch.randn(2, 4), torch.randn(2, 4))


def _ccc_eq1(t, p):
    corr = np.corrcoef(t, p)[0, 1]
    return 2 * corr * t.std() * p.std() / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)


def test_ccc_loss_per_column_against_eq1():
    rng = np.random.default_rng(4)
    target = rng.standard_normal((50, 2))
    pred = 0.6 * target + 0.3 * rng.standard_normal((50, 2)) + 0.2
    got = ccc_loss(torch.tensor(pred), torch.tensor(target)).item()
    expected = np.mean([1 - _ccc_eq1(target[:, c], pred[:, c]) for c in range(2)])
    assert got == pytest.approx(expected, rel=1e-5)
    one = ccc_loss(torch.tensor(pred[:, 0]), torch.tensor(target[:, 0])).item()
    assert one == pytest.approx(1 - _ccc_eq1(target[:, 0], pred[:, 0]), rel=1e-5)


def test_ccc_loss_gradient_improves_agreement():
    target = torch.linspace(-1, 1, 32)
    pred = torch.zeros(32, requires_grad=True)
    opt = torch.optim.SGD([pred], lr=5.0)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = ccc_loss(pred + 0.01 * torch.randn(32), target)
        loss.backward()
        first = first if first is not None else loss.item()
        opt.step()
    assert loss.item() < 0.2 < first
    with pytest.raises(ValueError):
        ccc_loss(torch.zeros(3), torch.zeros(4))


def test_rkd_loss_at_small_scales_and_with_three_points():
    # distances far below 1 (clamped only against sqrt(0)) and the smallest batch RKD takes
    rng = np.random.default_rng(5)
    s, t = 1e-2 * rng.standard_normal((5, 7)), 1e-2 * rng.standard_normal((5, 80))
    assert rkd_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(_rkd_reference(s, t, 1.0, 2.0), rel=1e-4)
    s3, t3 = rng.standard_normal((3, 7)), rng.standard_normal((3, 80))
    assert rkd_loss(torch.tensor(s3), torch.tensor(t3)).item() == pytest.approx(_rkd_reference(s3, t3, 1.0, 2.0),
                                                                                 rel=1e-5)
    with pytest.raises(ValueError):
        rkd_loss(torch.tensor(s3[:2]), torch.tensor(t3[:2]))


def test_face_loss_config_takes_zero_weights_and_refuses_negative_ones():
    from aver.losses import FaceLossConfig

    FaceLossConfig(affectnet_weight=0.0, rkd_distance_weight=0.0)  # e.g. an ablation: a term switched off
    with pytest.raises(ValueError):
        FaceLossConfig(affectnet_weight=-0.1)
