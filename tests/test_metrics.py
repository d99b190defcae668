import numpy as np
import pytest
import torch

from aver.metrics import balanced_logreg_accuracy, ccc, triplet_accuracy


def test_ccc_against_eq1_numpy_and_torch():
    rng = np.random.default_rng(0)
    t = rng.standard_normal(200)
    p = 0.5 * t + 0.4 * rng.standard_normal(200) - 0.3
    corr = np.corrcoef(t, p)[0, 1]
    expected = 2 * corr * t.std() * p.std() / (t.var() + p.var() + (t.mean() - p.mean()) ** 2)
    assert ccc(t, p) == pytest.approx(expected, rel=1e-9)
    assert ccc(torch.tensor(t), torch.tensor(p)) == pytest.approx(expected, rel=1e-6)
    assert ccc(t, t) == pytest.approx(1.0)
    assert ccc(t - t.mean(), t.mean() - t) == pytest.approx(-1.0)
    assert ccc(t, t + 1.0) < 1.0  # bias is penalised, unlike Pearson's r
    with pytest.raises(ValueError):
        ccc([1.0, 2.0], [1.0])


def test_triplet_accuracy_counts_closest_pairs():
    i = np.array([[1, 0], [1, 0], [1, 0]], dtype=float)
    j = np.array([[1, 0.1], [0, 1], [-1, 0]], dtype=float)
    k = np.array([[0, 1], [1, 0.1], [0, 1]], dtype=float)
    # triplet 0: (i,j) closest; 1: (i,k) closest; 2: (i,k)/(j,k) closer than (i,j)
    assert triplet_accuracy(i, j, k) == pytest.approx(1 / 3)
    # Scale does not matter: embeddings are normalised as in the loss.
    assert triplet_accuracy(10 * i, j, 0.1 * k) == pytest.approx(1 / 3)


def test_balanced_logreg_accuracy_chooses_the_regularisation_by_cross_validation():
    # Weak signal in 100 dimensions, 20 training examples per class, 30 % of their labels wrong:
    # a loose probe (C=1) fits the noise; cross-validation on the training split picks a stronger penalty.
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((8, 100)) * 0.25
    y, yt = np.repeat(np.arange(8), 20), np.repeat(np.arange(8), 30)
    x, xt = centers[y] + rng.standard_normal((len(y), 100)), centers[yt] + rng.standard_normal((len(yt), 100))
    wrong = rng.random(len(y)) < 0.3
    y[wrong] = rng.integers(0, 8, wrong.sum())
    fixed = {c: balanced_logreg_accuracy(x, y, xt, yt, C=c) for c in (0.001, 0.01, 0.1, 1.0)}
    chosen = balanced_logreg_accuracy(x, y, xt, yt)
    assert chosen > fixed[1.0] + 0.1
    assert chosen in fixed.values()


def test_balanced_logreg_accuracy_on_imbalanced_blobs():
    rng = np.random.default_rng(1)
    counts = [300, 40, 40, 20, 20, 20, 20, 10]
    centers = rng.standard_normal((8, 16)) * 4
    x = np.concatenate([centers[c] + rng.standard_normal((n, 16)) for c, n in enumerate(counts)])
    y = np.concatenate([[c] * n for c, n in enumerate(counts)])
    xt = np.concatenate([centers[c] + rng.standard_normal((25, 16)) for c in range(8)])
    yt = np.repeat(np.arange(8), 25)
    assert balanced_logreg_accuracy(x, y, xt, yt) > 0.95
    # A class with a single training example leaves no folds to cross-validate: a fixed C is used.
    assert balanced_logreg_accuracy(x[y != 7][:-1].tolist() + [x[y == 7][0]], y[y != 7][:-1].tolist() + [7], xt, yt) > 0.9
    # Random features give chance-level accuracy: the metric is not trivially high.
    assert balanced_logreg_accuracy(rng.standard_normal(x.shape), y, rng.standard_normal(xt.shape), yt) < 0.3


def test_triplet_accuracy_counts_a_tie_as_a_miss():
    # the annotated pair must be strictly the closest: here i is as far from j as from k
    e_i, e_j, e_k = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[0.0, -1.0]])
    assert triplet_accuracy(e_i, e_j, e_k) == 0.0


def test_ccc_of_equal_constants_is_one():
    assert ccc(np.full(5, 0.3), np.full(5, 0.3)) == 1.0
    assert ccc(np.full(5, 0.3), np.full(5, -0.3)) == 0.0


def test_triplet_accuracy_ties_on_either_side_and_scale():
    e_i, e_j, e_k = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[-1.0, 0.0]])
    assert triplet_accuracy(e_i, e_j, e_k) == 0.0  # j is as far from i as from k
    rng = np.random.default_rng(0)
    a, b, c = rng.standard_normal((3, 40, 8))
    assert triplet_accuracy(a, b, c) == triplet_accuracy(1e-3 * a, 1e-3 * b, 1e-3 * c)  # only directions count


def test_ccc_of_one_pair():
    assert ccc(np.array([0.5]), np.array([0.5])) == 1.0


def test_balanced_logreg_falls_back_to_c_one_for_a_class_seen_once():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)  # noisy, 30-d: the regularisation changes predictions here
    y = np.array([0] * 10 + [1] * 10 + [2])
    x = rng.standard_normal((21, 30)) + 0.3 * y[:, None]
    yt = np.array([0, 1, 2] * 20)
    xt = rng.standard_normal((60, 30)) + 0.3 * yt[:, None]

    def accuracy(c):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))
        return float((model.fit(x, y).predict(xt) == yt).mean())

    assert accuracy(1.0) != accuracy(2.5)
    assert balanced_logreg_accuracy(x, y, xt, yt) == pytest.approx(accuracy(1.0))
