"""Knowledge distillation for fine-tuning a pruned net from the unpruned one (Hinton et al.).

The loss is ``(1 − α)·CE(student, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))``;
the ``T²`` keeps the gradient scale of the soft term independent of ``T``. Teacher and
student see the same augmented batch (the trainer passes it to both). A teacher trained
with label smoothing transfers less "dark knowledge" (Müller et al., 2019): keep ``T`` low
(1–2) with such a teacher.

Example:
    >>> import torch
    >>> s, t = torch.zeros(2, 3), torch.zeros(2, 3)
    >>> float(distill_loss(s, t, torch.tensor(1.0), 0.5, 4.0))  # identical logits: KL is 0
    0.5
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distill_loss"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, ce: torch.Tensor, alpha: float,
                 temperature: float) -> torch.Tensor:
    """``(1 − alpha)·ce + alpha·T²·KL(teacher ‖ student)`` at temperature ``T`` (batch mean)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * (t * t) * kl
