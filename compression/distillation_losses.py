"""Distillation losses: Hinton KD on softened probabilities, FitNets hints, attention transfer.

* ``kd_loss``: T^2 * KL(p_teacher || softmax(student / T)), batch mean (Hinton, Vinyals & Dean
  2015, "Distilling the Knowledge in a Neural Network"; the T^2 keeps gradient magnitudes
  independent of T; written as in RepDistiller's ``DistillKL``, Tian et al. 2020).
* ``teacher_probabilities``: an ensemble's target is the average of the teachers' softened
  probabilities (Hinton et al. section 2), not of their logits.
* ``fitnets_loss``: mean squared error between a 1x1-conv regressor of a student feature map and
  the teacher's (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").
* ``attention_loss``: squared distance of L2-normalised spatial attention maps sum_c |A_c|^2
  (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"; their ``at_loss``).

Everything is computed in float32 whatever the autocast dtype of the inputs (softmax of fp16
logits divided by T loses too much precision).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def teacher_probabilities(teacher_logits: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over teachers of softmax(logits / T): the soft target of a (possibly one-member) ensemble."""
    if not teacher_logits:
        raise ValueError("teacher_probabilities needs at least one teacher's logits")
    probs = [F.softmax(logits.float() / temperature, dim=1) for logits in teacher_logits]
    return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_probs || softmax(student_logits / T)), summed over classes, averaged over the batch."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs.float(), reduction="batchmean") * temperature ** 2


def _match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger map down to the smaller one's height x width (no-op when equal)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)


def fitnets_loss(adapted_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student map and the teacher map (FitNets eq. 3, mean-reduced)."""
    student, teacher = _match_spatial(adapted_student.float(), teacher.float())
    return F.mse_loss(student, teacher)


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis: mean_c A_c^2, flattened and L2-normalised per sample."""
    return F.normalize(features.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean((Q_s - Q_t)^2) of the normalised attention maps (channel counts may differ)."""
    student, teacher = _match_spatial(student, teacher)
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()


def make_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    """FitNets regressor: a learned 1x1 convolution from the student's channels to the teacher's."""
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
