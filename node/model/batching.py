"""Token-id prompts as one batch of tensors, shared by everything here that generates in batches
(the torch backend, the tiny model's accuracy check, the rollout benchmark).

Rows are left-padded, so every prompt ends at the same column and the first generated token of
every row lands in the same one.

>>> ids_B_W, mask_B_W = left_pad([[5, 6, 7], [8]], pad_id=0)
>>> ids_B_W.tolist(), mask_B_W.tolist()
([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
"""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W], attention mask [B, W])``, left-padded so every row ends at the same place."""
    width = max(len(p) for p in prompts)
    ids_B_W = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_B_W = torch.zeros_like(ids_B_W)
    for i, p in enumerate(prompts):
        ids_B_W[i, width - len(p) :] = torch.tensor(p)
        mask_B_W[i, width - len(p) :] = 1
    return ids_B_W, mask_B_W
