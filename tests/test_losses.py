"""SigLIP / CLIP losses against naive single-process references: values, gradients, chunking, 2- and 3-process runs."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from med3dvlm.losses import ClipLoss, SigLipLoss, make_loss, sigmoid_block_loss


def naive_siglip(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, b: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Med3DVLM eq. 5 written out term by term: -(1/N) sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
    n = x.shape[0]
    total = x.new_zeros(())
    for i in range(n):
        for j in range(n):
            sim = x[i] @ y[j]
            if symmetric:
                sim = (x[i] @ y[j] + x[j] @ y[i]) / 2
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (t * sim + b)))
    return total / n


def naive_clip(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(mean_i -log softmax_j(s x_i.y_j)[i] + mean_j -log softmax_i(s x_i.y_j)[j]) / 2."""
    n = x.shape[0]
    sims = scale * torch.stack([torch.stack([x[i] @ y[j] for j in range(n)]) for i in range(n)])
    i2t = -sum(torch.log(torch.exp(sims[i, i]) / torch.exp(sims[i]).sum()) for i in range(n)) / n
    t2i = -sum(torch.log(torch.exp(sims[j, j]) / torch.exp(sims[:, j]).sum()) for j in range(n)) / n
    return (i2t + t2i) / 2


def _features(n: int = 12, d: int = 16, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    # Partly aligned pairs so positives and negatives both matter.
    with torch.no_grad():
        y.copy_(F.normalize(y + 1.5 * x, dim=-1))
    t_prime = torch.tensor(math.log(1 / 0.07), dtype=dtype, requires_grad=True)
    b = torch.tensor(-1.3, dtype=dtype, requires_grad=True)
    return x, y, t_prime, b


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("chunk_size", [0, 1, 5, 12, 100])
def test_siglip_matches_naive_values_and_grads(chunk_size: int) -> None:
    x, y, t_prime, b = _features()
    ref = naive_siglip(x, y, t_prime.exp(), b)
    ref_grads = _grads(ref, x, y, t_prime, b)
    loss = SigLipLoss(chunk_size=chunk_size)(x, y, t_prime.exp(), b)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(_grads(loss, x, y, t_prime, b), ref_grads):
        torch.testing.assert_close(got, want)


def test_siglip_symmetric_logits_matches_naive_and_differs_from_eq5() -> None:
    x, y, t_prime, b = _features()
    ref = naive_siglip(x, y, t_prime.exp(), b, symmetric=True)
    loss = SigLipLoss(symmetric_logits=True)(x, y, t_prime.exp(), b)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(_grads(loss, x, y, t_prime, b), _grads(ref, x, y, t_prime, b)):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(loss, SigLipLoss()(x, y, t_prime.exp(), b))


def test_siglip_known_value_at_init() -> None:
    # Orthogonal features (all similarities 0), b = 0: every term is -log sigmoid(0) = log 2, N terms per row.
    n = 4
    x = torch.eye(n, 8)
    y = torch.eye(n, 8).roll(4, dims=1)
    loss = SigLipLoss()(x, y, torch.tensor(1 / 0.07), torch.tensor(0.0))
    torch.testing.assert_close(loss, torch.tensor(n * math.log(2)))


def test_siglip_bias_none_equals_zero_bias() -> None:
    x, y, t_prime, _ = _features()
    a = SigLipLoss()(x, y, t_prime.exp(), None)
    c = SigLipLoss(chunk_size=3)(x, y, t_prime.exp(), torch.zeros((), dtype=x.dtype))
    torch.testing.assert_close(a, c)


def test_chunked_block_gradcheck() -> None:
    x, y, t_prime, b = _features(n=5, d=4)
    scale = t_prime.detach().exp().requires_grad_()

    def f(x, y, s, b):
        return sigmoid_block_loss(x, y, s, b, pos_offset=1, chunk_size=2)

    assert torch.autograd.gradcheck(f, (x, y, scale, b))
    # Block with negatives only (what the ring adds for other ranks' texts).
    assert torch.autograd.gradcheck(lambda x, y, s, b: sigmoid_block_loss(x, y, s, b, None, 2), (x, y, scale, b))


def test_chunked_loss_keeps_no_logits_for_backward() -> None:
    # What autograd keeps between forward and backward decides the memory of a big batch: the chunked path
    # must keep only the (N, D) features, never an N x N (or chunk x N) logit block.
    n, d = 64, 8
    x, y, t_prime, b = (v.detach().float().requires_grad_() for v in _features(n=n, d=d))
    sizes: dict[int, list[int]] = {}
    for chunk in (0, 4):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            SigLipLoss(chunk_size=chunk)(x, y, t_prime.exp(), b)
        sizes[chunk] = saved
    assert max(sizes[0]) >= n * n  # the plain path keeps the logits
    assert max(sizes[4]) <= n * d


def test_bfloat16_features_are_summed_in_float32() -> None:
    x, y, t_prime, b = _features()
    want = SigLipLoss()(x, y, t_prime.exp(), b)
    xb, yb = x.detach().bfloat16().requires_grad_(), y.detach().bfloat16().requires_grad_()
    for chunk in (0, 4):
        loss = SigLipLoss(chunk_size=chunk)(xb, yb, t_prime.exp().float(), b.float())
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-2, atol=2e-2)
        loss.backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
        xb.grad = yb.grad = None


def test_clip_matches_naive_values_and_grads() -> None:
    x, y, s, _ = _features()
    ref = naive_clip(x, y, s.exp())
    loss = ClipLoss()(x, y, s.exp())
    torch.testing.assert_close(loss, ref)
    for got, want in zip(_grads(loss, x, y, s), _grads(ref, x, y, s)):
        torch.testing.assert_close(got, want)


def test_clip_symmetric_in_modalities() -> None:
    x, y, s, _ = _features()
    torch.testing.assert_close(ClipLoss()(x, y, s.exp()), ClipLoss()(y, x, s.exp()))


def test_make_loss_and_bad_args() -> None:
    assert isinstance(make_loss("siglip", chunk_size=4), SigLipLoss)
    assert isinstance(make_loss("clip"), ClipLoss)
    with pytest.raises(ValueError):
        make_loss("nce")
    with pytest.raises(ValueError):
        SigLipLoss(dist_impl="bidir")
    with pytest.raises(ValueError):
        SigLipLoss(dist_impl="ring", symmetric_logits=True)
    x, y, t, b = _features()
    with pytest.raises(ValueError):
        SigLipLoss()(x, y[:-1], t.exp(), b)


# ---------------------------------------------------------------------------------------------------------------
# Real multi-process runs (gloo, CPU). Every rank builds the same global inputs and a tiny shared "model"
# (two linear heads), embeds its own slice, computes the loss, backpropagates and averages gradients the way
# DDP does. The averaged loss and gradients must equal the single-process full-batch ones.

GLOBAL_BATCH = 12
CASES = {
    "siglip_gather": dict(kind="siglip", dist_impl="gather"),
    "siglip_gather_chunked": dict(kind="siglip", dist_impl="gather", chunk_size=2),
    "siglip_ring": dict(kind="siglip", dist_impl="ring"),
    "siglip_ring_chunked": dict(kind="siglip", dist_impl="ring", chunk_size=3),
    "siglip_symmetric": dict(kind="siglip", symmetric_logits=True),
    "clip": dict(kind="clip"),
}


def _problem():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=torch.float64)
    texts = images @ torch.randn(10, 10, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        GLOBAL_BATCH, 10, generator=g, dtype=torch.float64
    )
    params = {
        "w_img": torch.randn(10, 8, generator=g, dtype=torch.float64),
        "w_txt": torch.randn(10, 8, generator=g, dtype=torch.float64),
        "t_prime": torch.tensor(math.log(10.0), dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }
    return images, texts, params


def _step(case: dict, images, texts, params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    x = F.normalize(images @ params["w_img"], dim=-1)
    y = F.normalize(texts @ params["w_txt"], dim=-1)
    kwargs = {k: v for k, v in case.items() if k != "kind"}
    loss_fn = make_loss(case["kind"], **kwargs)
    bias = params["bias"] if case["kind"] == "siglip" else None
    loss = loss_fn(x, y, params["t_prime"].exp(), bias)
    names = [k for k in params if k != "bias" or bias is not None]
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    return loss.detach(), dict(zip(names, grads))


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images, texts, params = _problem()
        per = GLOBAL_BATCH // world_size
        sl = slice(rank * per, (rank + 1) * per)
        results = {}
        for name, case in CASES.items():
            loss, grads = _step(case, images[sl], texts[sl], params)
            # What DDP does: average gradients over ranks. Report the mean loss as well.
            dist.all_reduce(loss)
            loss /= world_size
            for g in grads.values():
                dist.all_reduce(g)
                g /= world_size
            results[name] = (loss, grads)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_equals_single_process(world_size: int, tmp_path) -> None:
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_worker, args=(world_size, init_file, str(tmp_path)), nprocs=world_size, join=True)
    results = torch.load(tmp_path / "results.pt")
    images, texts, params = _problem()
    for name, case in CASES.items():
        want_loss, want_grads = _step(case, images, texts, params)
        got_loss, got_grads = results[name]
        torch.testing.assert_close(got_loss, want_loss, msg=lambda m: f"{name}: {m}")
        assert got_grads.keys() == want_grads.keys()
        for k in want_grads:
            torch.testing.assert_close(got_grads[k], want_grads[k], msg=lambda m: f"{name} grad {k}: {m}")


def test_single_process_ring_and_gather_equal_naive() -> None:
    # Without torch.distributed both modes reduce to the full-batch loss.
    images, texts, params = _problem()
    ref_loss, _ = _step(dict(kind="siglip", dist_impl="gather"), images, texts, params)
    for case in (dict(kind="siglip", dist_impl="ring"), dict(kind="siglip", dist_impl="ring", chunk_size=5)):
        loss, _ = _step(case, images, texts, params)
        torch.testing.assert_close(loss, ref_loss)
    x = F.normalize(images @ params["w_img"], dim=-1)
    y = F.normalize(texts @ params["w_txt"], dim=-1)
    torch.testing.assert_close(ref_loss, naive_siglip(x, y, params["t_prime"].exp(), params["bias"]))
