"""Self-distillation and clustering losses (teacher–student: DINO, iBOT, SwAV, KoLeo).

**Whole-batch state.** DINO's and iBOT's centres and SwAV's codes depend on the whole batch a
call sees. Under gradient accumulation each micro-batch moves the centre (k EMA steps per
optimiser step) and gets its own codes; under gradient caching (``embedloss.gradcache``) the
loss sees the full batch once per step, so the centre moves once and the codes are those of the
full batch: exactly large-batch training. Under DDP pass ``gather_distributed=True``: centres
and codes then come from the batch of every rank.
"""

from embedloss.self_distillation.dino import DINOLoss, dino_loss
from embedloss.self_distillation.ibot_patch import IBOTPatchLoss, ibot_patch_loss
from embedloss.self_distillation.koleo import KoLeoLoss, koleo_loss
from embedloss.self_distillation.swav import SwAVLoss, swav_loss

__all__ = [
    "DINOLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "SwAVLoss",
    "dino_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "swav_loss",
]
