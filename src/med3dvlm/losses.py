"""Contrastive image-text losses: SigLIP (pairwise sigmoid) and CLIP (InfoNCE), features in, loss out.

- SigLIP: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023, https://arxiv.org/abs/2303.15343.
  Med3DVLM (Xin et al., IEEE JBHI 2025, https://ieeexplore.ieee.org/document/11145341) trains its stage-1 DCFormer +
  BERT model with it; its equation 5 is

      loss = -(1/N) sum_i sum_j log sigmoid(z_ij * (t * x_i . y_j + b)),   z_ij = +1 if i == j else -1,

  with t = exp(t') learnable (t' = log(1/0.07), b = 0 at init in the original code; the SigLIP paper uses
  t' = log 10, b = -10) and N the *global* batch size.
- CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021,
  https://arxiv.org/abs/2103.00020: symmetric cross-entropy over the cosine-similarity matrix scaled by exp(s).

Callers pass L2-normalized features and the *already exponentiated* scale (`logit_scale = exp(t')`), like
open_clip. The original code's single-process SigLIP used t' without exp and summed without dividing by N,
and its CLIP used the raw scale; none of that is reproduced here.

Distributed training. Every rank passes only its local features (equal local batch sizes on all ranks).
Each rank's loss covers its own image rows (and, for CLIP, its own text columns) against the whole global
batch and is divided by the *local* batch size, so that

    mean over ranks of the per-rank losses == the single-process loss on the global batch,

and because feature gradients flow back across ranks through the exchange, DDP's gradient *averaging* gives
exactly the single-process full-batch gradients (tests/test_losses.py checks this in a real 2-process run).

Two ways to see the other ranks' texts (`SigLipLoss(dist_impl=...)`):
- "gather": all-gather the features with gradients (what the original code does); each rank holds a
  B_local x N logit block.
- "ring": pass text blocks around the ring of ranks, one neighbour exchange per step, as open_clip's
  "shift" implementation; with `chunk_size > 0` the per-block loss is computed chunk by chunk and recomputed
  in backward, so no rank ever materializes more than `chunk_size x B_local` logits and peak memory no
  longer grows with B_local x N.

The original distributed path symmetrizes the logits, (L + L^T) / 2, before the sigmoid. That is *not*
equation 5 (entry (i, j) then mixes x_i . y_j with x_j . y_i, and the loss changes by Jensen's inequality),
so the default here follows the paper; `symmetric_logits=True` reproduces the original's variant in the
full-matrix ("gather", unchunked) path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "all_gather_with_grad",
    "make_loss",
    "neighbour_exchange_with_grad",
    "sigmoid_block_loss",
]


# --------------------------------------------------------------------------------------------------------------
# process-group helpers


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world_size) in `group`; (0, 1) when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank, world_size = _world(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # Every rank holds a gradient for every slice; the owner of a slice needs their sum. An all-reduce
        # is a reduce-scatter that every backend (gloo included) supports, at the price of moving the
        # whole (N, D) gradient; features are small next to the logits, so that is fine.
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: never touch autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return None, grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph.

    Backward sums the gradients of each rank's slice over all ranks and hands it back to its owner, so every
    rank's features get the gradient of the sum of all ranks' losses. Needs equal shapes on all ranks.
    A no-op outside torch.distributed.
    """
    _, world_size = _world(group)
    if world_size == 1:
        return tensor
    return _AllGather.apply(group, tensor)


def _global_rank(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _exchange(send_to: int, recv_from: int, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Send `tensor` to one rank and receive a tensor of the same shape from another (group ranks)."""
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor.contiguous(), _global_rank(group, send_to), group),
        dist.P2POp(dist.irecv, received, _global_rank(group, recv_from), group),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_to: int, recv_from: int, group, tensor: torch.Tensor):  # type: ignore[override]
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        return _exchange(send_to, recv_from, tensor, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # The rank we sent to holds the gradient of what it received: reverse the direction to bring it home.
        return None, None, None, _exchange(ctx.recv_from, ctx.send_to, grad, ctx.group)


def neighbour_exchange_with_grad(
    send_to: int, recv_from: int, tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Point-to-point exchange (send to `send_to`, receive from `recv_from`) that routes gradients back."""
    return _NeighbourExchange.apply(send_to, recv_from, group, tensor)


# --------------------------------------------------------------------------------------------------------------
# SigLIP


def _check_pair(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "paired features need equal (B, D) shapes, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are summed in float32; float32/float64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sigmoid_terms(logits: torch.Tensor, pos_rows: torch.Tensor, pos_cols: torch.Tensor) -> torch.Tensor:
    """Sum of -log sigmoid(z * logits), z = +1 at (pos_rows, pos_cols) and -1 elsewhere.

    -log sigmoid(-l) = softplus(l) for every pair, and softplus(-l) - softplus(l) = -l corrects the
    positives, so no label matrix is built.
    """
    total = F.softplus(logits).sum()
    if pos_rows.numel():
        total = total - logits[pos_rows, pos_cols].sum()
    return total


def _positives(
    rows: int, cols: int, row_start: int, pos_offset: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (within a chunk of `rows` rows starting at row `row_start`) of entries with i + offset == j."""
    if pos_offset is None:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    local = torch.arange(rows, device=device)
    cols_idx = local + row_start + pos_offset
    keep = (cols_idx >= 0) & (cols_idx < cols)
    return local[keep], cols_idx[keep]


class _ChunkedSigmoidLoss(torch.autograd.Function):
    """Sum of SigLIP terms over a block, computed `chunk` rows at a time; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, pos_offset, chunk):  # type: ignore[override]
        ctx.save_for_backward(x, y, scale, bias)
        ctx.pos_offset, ctx.chunk = pos_offset, chunk
        total = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            logits = _acc(scale * (xc @ y.T) + bias)
            rows, cols = _positives(xc.shape[0], y.shape[0], start, pos_offset, x.device)
            total = total + _sigmoid_terms(logits, rows, cols)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)
        gx = torch.empty_like(x, dtype=acc)
        gy = torch.zeros_like(y, dtype=acc)
        gscale = torch.zeros((), dtype=acc, device=x.device)
        gbias = torch.zeros((), dtype=acc, device=x.device)
        yf, s, b = y.to(acc), scale.to(acc), bias.to(acc)
        for start in range(0, x.shape[0], ctx.chunk):
            xc = x[start : start + ctx.chunk].to(acc)
            sims = xc @ yf.T
            logits = s * sims + b
            # d softplus(l)/dl = sigmoid(l); the positives' extra -l contributes -1.
            g = torch.sigmoid(logits)
            rows, cols = _positives(xc.shape[0], y.shape[0], start, ctx.pos_offset, x.device)
            if rows.numel():
                g[rows, cols] -= 1.0
            g = g * grad_total
            gx[start : start + ctx.chunk] = s * (g @ yf)
            gy += s * (g.T @ xc)
            gscale += (g * sims).sum()
            gbias += g.sum()
        return (
            gx.to(x.dtype),
            gy.to(y.dtype),
            gscale.to(scale.dtype).reshape(scale.shape),
            gbias.to(bias.dtype).reshape(bias.shape),
            None,
            None,
        )


def sigmoid_block_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    pos_offset: int | None = 0,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Sum (not mean) of -log sigmoid(z_ij (t x_i . y_j + b)) over one image block x one text block.

    `pos_offset`: image row i is paired with text row i + pos_offset (None: the block holds only negatives).
    `chunk_size > 0` bounds memory to `chunk_size x len(text_features)` logits in forward *and* backward
    (a custom autograd function recomputes them); 0 uses plain autograd over the whole block.
    """
    scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device)
    bias = (
        torch.zeros((), dtype=image_features.dtype, device=image_features.device)
        if logit_bias is None
        else torch.as_tensor(logit_bias, dtype=image_features.dtype, device=image_features.device)
    )
    if chunk_size > 0:
        return _ChunkedSigmoidLoss.apply(image_features, text_features, scale, bias, pos_offset, chunk_size)
    logits = _acc(scale * (image_features @ text_features.T) + bias)
    rows, cols = _positives(image_features.shape[0], text_features.shape[0], 0, pos_offset, image_features.device)
    return _sigmoid_terms(logits, rows, cols)


class ContrastiveLoss(nn.Module):
    """The contract of the contrastive losses: features, scale and bias in, a scalar out.

    `forward` checks that the pair fits; each loss implements `pair_loss` on the checked pair.
    """

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_pair(image_features, text_features)
        return self.pair_loss(image_features, text_features, logit_scale, logit_bias)

    def pair_loss(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        raise NotImplementedError


class SigLipLoss(ContrastiveLoss):
    """Pairwise sigmoid loss (Med3DVLM eq. 5), averaged over the global batch.

    forward(image_features (B, D), text_features (B, D), logit_scale t, logit_bias b) -> scalar.
    Under torch.distributed each rank passes its local batch; see the module docstring for how per-rank
    losses relate to the global loss.

    Args:
        dist_impl: "gather" (all-gather texts with gradients) or "ring" (neighbour exchange of text blocks).
        chunk_size: rows of logits computed at a time, with recomputation in backward; 0 = no chunking.
        symmetric_logits: use (L + L^T) / 2 like the original's distributed path (gather mode, no chunking).
        group: process group; None = the default group.
    """

    def __init__(
        self,
        dist_impl: Literal["gather", "ring"] = "gather",
        chunk_size: int = 0,
        symmetric_logits: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if dist_impl not in ("gather", "ring"):
            raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0, got {chunk_size}")
        if symmetric_logits and (dist_impl != "gather" or chunk_size):
            raise ValueError("symmetric_logits needs the full logit rows: use dist_impl='gather' and chunk_size=0")
        self.dist_impl = dist_impl
        self.chunk_size = chunk_size
        self.symmetric_logits = symmetric_logits
        self.group = group

    def pair_loss(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        rank, world_size = _world(self.group)
        batch = image_features.shape[0]
        if self.symmetric_logits:
            return self._symmetric(image_features, text_features, logit_scale, logit_bias, rank, world_size)
        if world_size == 1 or self.dist_impl == "gather":
            all_text = all_gather_with_grad(text_features, self.group)
            # Image row i of this rank is paired with global text row rank * batch + i.
            offset = rank * batch
            total = sigmoid_block_loss(image_features, all_text, logit_scale, logit_bias, offset, self.chunk_size)
            return total / batch
        # Ring: start with the local block (it holds the positives), then receive every other rank's texts
        # from the left neighbour while passing the current block to the right one.
        total = sigmoid_block_loss(image_features, text_features, logit_scale, logit_bias, 0, self.chunk_size)
        right, left = (rank + 1) % world_size, (rank - 1) % world_size
        block = text_features
        for _ in range(world_size - 1):
            block = neighbour_exchange_with_grad(right, left, block, self.group)
            negatives = sigmoid_block_loss(image_features, block, logit_scale, logit_bias, None, self.chunk_size)
            total = total + negatives
        return total / batch

    def _symmetric(self, image_features, text_features, logit_scale, logit_bias, rank, world_size) -> torch.Tensor:
        all_image = all_gather_with_grad(image_features, self.group)
        all_text = all_gather_with_grad(text_features, self.group)
        # Rows of (L + L^T)/2 for the local samples: entry (i, j) averages x_i . y_j and x_j . y_i.
        sims = (image_features @ all_text.T + text_features @ all_image.T) / 2
        logits = _acc(logit_scale * sims + (0.0 if logit_bias is None else logit_bias))
        batch = image_features.shape[0]
        rows = torch.arange(batch, device=logits.device)
        return _sigmoid_terms(logits, rows, rows + rank * batch) / batch


# --------------------------------------------------------------------------------------------------------------
# CLIP


class ClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE: (CE(images -> texts) + CE(texts -> images)) / 2 over logits exp(s) * x . y.

    forward(image_features (B, D), text_features (B, D), logit_scale exp(s)) -> scalar. Under
    torch.distributed each rank gathers the other ranks' features with gradients and scores only its own
    rows and columns (B_local x N logits, never N x N); the mean over ranks is the global-batch loss.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def pair_loss(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        rank, _ = _world(self.group)
        all_image = all_gather_with_grad(image_features, self.group)
        all_text = all_gather_with_grad(text_features, self.group)
        bias = 0.0 if logit_bias is None else logit_bias
        logits_per_image = _acc(logit_scale * image_features @ all_text.T + bias)
        logits_per_text = _acc(logit_scale * text_features @ all_image.T + bias)
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def make_loss(kind: Literal["siglip", "clip"], **kwargs) -> nn.Module:
    """`SigLipLoss(**kwargs)` or `ClipLoss(**kwargs)` by name (the `loss` field of a ContrastiveConfig)."""
    if kind == "siglip":
        return SigLipLoss(**kwargs)
    if kind == "clip":
        return ClipLoss(**kwargs)
    raise ValueError(f"unknown contrastive loss {kind!r}; choose 'siglip' or 'clip'")
