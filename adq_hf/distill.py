"""Knowledge distillation losses (ADQ trains quantized students against a full-precision teacher)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T^2 (Hinton et al.) so its
    gradient scale does not depend on the temperature."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``kd_weight * KD + ce_weight * CE``; either term is dropped when its weight is 0 or its input is missing."""
    loss = student_logits.new_zeros(())
    if kd_weight and teacher_logits is not None:
        loss = loss + kd_weight * kd_loss(student_logits, teacher_logits, temperature)
    if ce_weight and labels is not None:
        loss = loss + ce_weight * F.cross_entropy(student_logits.float(), labels)
    if not (kd_weight and teacher_logits is not None) and not (ce_weight and labels is not None):
        raise ValueError("distillation_loss has no term: give teacher_logits with kd_weight > 0 and/or labels with ce_weight > 0.")
    return loss
