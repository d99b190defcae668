"""The paper's training losses (SPEC §5): FEC triplet, relational distillation, CCC."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class FaceLossConfig:
    margin_one_class: float = 0.1
    """FEC triplet margin for one-class triplets."""
    margin_two_class: float = 0.1
    """FEC triplet margin for two-class triplets."""
    margin_three_class: float = 0.2
    """FEC triplet margin for three-class triplets."""
    affectnet_weight: float = 1.0
    """alpha in L = L_FEC + alpha * L_AffectNet."""
    rkd_distance_weight: float = 1.0
    """Weight of RKD's distance term (student only)."""
    rkd_angle_weight: float = 2.0
    """Weight of RKD's angle term (student only)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"FaceLossConfig.{name} must be a non-negative number, got {value!r}")

    def margins(self, triplet_type: torch.Tensor) -> torch.Tensor:
        """Per-triplet margins for type codes 0/1/2 (``aver.constants.FEC_TRIPLET_TYPES``)."""
        table = torch.tensor([self.margin_one_class, self.margin_two_class, self.margin_three_class],
                             device=triplet_type.device)
        return table[triplet_type.long()]


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum(dim=1)


def fec_triplet_loss(e_i: torch.Tensor, e_j: torch.Tensor, e_k: torch.Tensor,
                     margin: float | torch.Tensor) -> torch.Tensor:
    """Batch mean of ``relu(m + d(i,j) - d(i,k)) + relu(m + d(i,j) - d(j,k))``.

    ``(i,j)`` is the annotated most-similar pair; embeddings are L2-normalised first and ``d`` is
    the squared L2 distance; ``margin`` is a float or a ``[B]`` tensor.
    """
    e_i, e_j, e_k = (F.normalize(e.float(), dim=1) for e in (e_i, e_j, e_k))
    d_ij = _sq_dist(e_i, e_j)
    m = torch.as_tensor(margin, dtype=d_ij.dtype, device=d_ij.device)
    loss = F.relu(m + d_ij - _sq_dist(e_i, e_k)) + F.relu(m + d_ij - _sq_dist(e_j, e_k))
    return loss.mean()


def _normalised_distances(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    d = (x[:, None] - x[None]).pow(2).sum(-1)[off].clamp_min(1e-12).sqrt()  # distinct pairs only
    return d / d.mean().clamp_min(1e-12)


def _angles(x: torch.Tensor) -> torch.Tensor:
    # cos of the angle at vertex j between i and k, for i != j and k != j.
    n = x.shape[0]
    diff = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # [j, i, D]: unit vector j -> i
    cos = torch.bmm(diff, diff.transpose(1, 2))  # [j, i, k]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    valid = ~(eye[:, :, None] | eye[:, None, :])  # i != j and k != j
    return cos[valid]


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 1.0,
             angle_weight: float = 2.0) -> torch.Tensor:
    """Relational knowledge distillation (Park et al. 2019): distance + angle terms, smooth-L1.

    Pairwise distances are divided by their mean over distinct pairs; angles are the cosines at
    every vertex of every triplet of batch points. Needs a batch of at least 3 points.
    """
    if student.shape[0] != teacher.shape[0] or student.shape[0] < 3:
        raise ValueError(f"rkd_loss needs equal batches of >= 3 points, got {student.shape[0]} and {teacher.shape[0]}")
    s, t = student.float(), teacher.float().detach()
    loss = student.new_zeros((), dtype=torch.float32)
    if distance_weight:
        loss = loss + distance_weight * F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - CCC`` per output column (Eq. 1, population statistics), averaged over columns."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p, t = pred.float(), target.float()  # [B] or [B, columns]: statistics over dim 0 either way
    mp, mt = p.mean(0), t.mean(0)
    cov = ((p - mp) * (t - mt)).mean(0)
    ccc = 2 * cov / (p.var(0, unbiased=False) + t.var(0, unbiased=False) + (mp - mt).pow(2) + 1e-8)
    return (1 - ccc).mean()
