"""Compute three losses by name and by class, with their logged terms."""

import torch

import embedloss

torch.manual_seed(0)
image, text = torch.randn(16, 64), torch.randn(16, 64)

clip = embedloss.create_loss("clip", temperature=0.07)
out = clip.compute(image, text)
print(f"clip loss = {out.loss.item():.4f}", {k: round(v.item(), 4) for k, v in out.terms.items()})

simclr = embedloss.SimCLRLoss(temperature=0.5)
print(f"simclr loss (view a, view b) = {simclr(image, image + 0.1 * text).item():.4f}")

info_nce = embedloss.create_loss_from_config({"name": "info_nce", "temperature": 0.1})
negatives = torch.randn(16, 32, 64)  # 32 negatives of its own for each query
print(f"info_nce loss with per-query negatives = {info_nce(image, text, negatives).item():.4f}")
