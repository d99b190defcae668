"""jobs/probe_faces.py's read-outs against independent formulas (its figures are in docs/decisions.md)."""

import numpy as np

from tests.ray_helpers import job_module

_probe = job_module("probe_faces")
nearest_class, ridge = _probe.nearest_class, _probe.ridge


def test_ridge_is_sklearns_on_standardised_features_and_recovers_a_linear_map():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) * rng.uniform(0.01, 100, 12)  # features of very different scales
    y = x @ rng.normal(size=12) + 3.0
    x_test = rng.normal(size=(50, 12)) * x.std(0)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    want = Ridge(alpha=0.1 * len(x)).fit((x - mu) / sd, y).predict((x_test - mu) / sd)
    assert np.allclose(ridge(x, y, x_test, 0.1), want, atol=1e-6)
    coef = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]  # least squares with an intercept
    assert np.allclose(ridge(x, y, x_test, 1e-9), x_test @ coef[:12] + coef[12], atol=1e-4)


def test_nearest_class_of_each_prototype_is_its_class():
    from aver.demo.corpus import PROTOTYPES

    assert nearest_class(0.8 * PROTOTYPES).tolist() == list(range(len(PROTOTYPES)))
    assert nearest_class(PROTOTYPES * 0.7 + 0.02).tolist() == list(range(len(PROTOTYPES)))
