"""Evaluation metrics of the paper: CCC (Eq. 1), FEC triplet accuracy, balanced AffectNet accuracy."""

from __future__ import annotations

import numpy as np
import torch


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def ccc(y_true, y_pred) -> float:
    """Concordance correlation coefficient, Eq. (1) with population statistics (1-D inputs)."""
    t, p = _to_numpy(y_true).ravel(), _to_numpy(y_pred).ravel()
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"ccc needs two non-empty arrays of one length, got {t.size} and {p.size}")
    mt, mp = t.mean(), p.mean()
    denom = t.var() + p.var() + (mt - mp) ** 2
    if denom == 0:  # both constant and equal: perfect agreement
        return 1.0
    return float(2 * ((t - mt) * (p - mp)).mean() / denom)


def triplet_accuracy(e_i, e_j, e_k) -> float:
    """Share of triplets whose annotated pair ``(i,j)`` is the closest of the three pairs.

    Distances are squared L2 between L2-normalised embeddings, as in the triplet loss.
    """
    def unit(e):
        e = _to_numpy(e)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    a, b, c = unit(e_i), unit(e_j), unit(e_k)
    d_ij, d_ik, d_jk = (((x - y) ** 2).sum(1) for x, y in ((a, b), (a, c), (b, c)))
    return float(np.mean((d_ij < d_ik) & (d_ij < d_jk)))


LOGREG_CS = (0.001, 0.01, 0.1, 1.0)


def balanced_logreg_accuracy(train_features, train_labels, test_features, test_labels, *,
                             C: float | None = None, Cs: tuple[float, ...] = LOGREG_CS, folds: int = 3,
                             max_iter: int = 2000) -> float:
    """AffectNet protocol (paper Table 1, footnote 3): logistic regression on frozen features,
    classes re-weighted to equal representation, accuracy on the test split. The inverse
    regularisation ``C`` is chosen from ``Cs`` by stratified ``folds``-fold cross-validation on the
    training split (a fixed ``C`` skips it; so do classes with fewer than 2 training examples)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(train_labels).astype(int)
    counts = np.bincount(y) if len(y) else np.zeros(1, int)
    folds = min(folds, int(counts[counts > 0].min(initial=len(y))))  # stratified folds: each class in each
    if C is None and folds >= 2:
        # fits in parallel processes only where they pay: each of joblib's workers costs seconds of
        # CPU to start, more than every fit of a few thousand rows takes
        n_jobs = 2 if y.size * np.shape(train_features)[-1] >= 2_000_000 else None
        model = LogisticRegressionCV(Cs=list(Cs), cv=folds, scoring="accuracy", l1_ratios=(0.0,),
                                     class_weight="balanced", max_iter=max_iter, n_jobs=n_jobs,
                                     use_legacy_attributes=False)
    else:
        model = LogisticRegression(C=1.0 if C is None else C, class_weight="balanced", max_iter=max_iter)
    clf = make_pipeline(StandardScaler(), model)
    clf.fit(_to_numpy(train_features), y)
    pred = clf.predict(_to_numpy(test_features))
    return float(np.mean(pred == np.asarray(test_labels).astype(int)))
