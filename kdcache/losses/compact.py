"""Compact batches decoded where they are used (GPU or CPU): pure torch, what `kdcache.losses` call first.

`KDCacheDataset(compact_targets=True)` ships a batch's head as stored, planar gap bytes and log-prob codes (3-5
instead of 12 bytes per entry); `expand_targets` turns them into `target_ids` and `target_logprobs` on the device the
batch lies on, exactly as docs/FORMAT.md decodes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["expand_targets"]


def expand_targets(batch: dict[str, Any]) -> dict[str, Any]:
    """Decode a compact batch's head where it lies (GPU or CPU): a new dict with `target_ids` (int64 ascending, 0 at
    padding; from the planar gap bytes as docs/FORMAT.md decodes them) and `target_logprobs`
    (`logprob_table[target_codes]`, -inf at padding) in place of the compact keys. A batch without them is returned
    as it is. Pure torch; `kdcache.losses` call it, so a compact batch can go straight to a loss.
    """
    if "target_gap_planes" not in batch and "target_codes" not in batch:
        return batch
    out = dict(batch)
    valid = out["loss_mask"].bool()
    if "target_gap_planes" in out:
        raw = out.pop("target_gap_planes")
        k = (out["target_codes"] if "target_codes" in out else out["target_logprobs"]).shape[-1]
        planes = raw.reshape(*raw.shape[:-1], raw.shape[-1] // max(k, 1), k).to(torch.int64)
        shifts = 8 * torch.arange(planes.shape[-2], device=raw.device, dtype=torch.int64)
        gaps = (planes << shifts[:, None]).sum(-2)
        ids = gaps.cumsum(-1) + torch.arange(k, device=raw.device, dtype=torch.int64)
        out["target_ids"] = ids.masked_fill(~valid.to(raw.device)[..., None], 0)
    if "target_codes" in out:
        codes = out.pop("target_codes")
        table = out.pop("logprob_table").to(codes.device)
        logprobs = table[codes.to(torch.int64)]
        out["target_logprobs"] = logprobs.masked_fill(~valid.to(codes.device)[..., None], -math.inf)
    return out
