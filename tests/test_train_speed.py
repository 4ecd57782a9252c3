"""The DCFormer training options (activation checkpointing, channels_last_3d, bf16 autocast) leave the
losses and gradients of the plain path unchanged, within float rounding, on the tiny registered variant."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import med3dvlm
from med3dvlm.hub import from_pretrained
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.train.clip import main as train_clip
from med3dvlm.train.loop import TrainConfig, apply_speed_options

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import tiny_phantom  # noqa: E402

RTOL = 1e-5


def _model() -> DCFormer:
    model = med3dvlm.create_model("dcformer_test")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.data.uniform_(0.5, 1.0)  # make the blocks matter, not just the 1e-6 init
    return model.train()


def _step(model: DCFormer, x: torch.Tensor, autocast: bool = False):
    """One fwd + bwd + AdamW step: the loss, the gradients, and the state afterwards."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        outputs = model(x)
        loss = sum(o.float().square().mean() for o in outputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), grads, {k: v.detach().clone() for k, v in model.state_dict().items()}, outputs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_identical_step(expected, got) -> None:
    """Checkpointing recomputes the same operations on the same inputs: bit-for-bit the same step."""
    (loss_e, grads_e, state_e, _), (loss_g, grads_g, state_g, _) = expected, got
    assert torch.equal(loss_e, loss_g)
    for n, g in grads_e.items():
        assert torch.equal(grads_g[n], g), n
    for k, v in state_e.items():  # weights after AdamW, BatchNorm running statistics and counters
        assert torch.equal(state_g[k], v), k


def _assert_same_step(expected, got, grad_rtol: float = RTOL, tensor_rtol: float = 10 * RTOL) -> None:
    """Another kernel layout: equal at float32 rounding.

    The loss within 1e-5 relative, the whole gradient within `grad_rtol` relative, every gradient tensor within
    `tensor_rtol`, and the biases of the convolutions that feed a training-mode BatchNorm, whose exact gradient is
    0 (the norm subtracts them out), at rounding level; the BatchNorm running statistics after the step within
    1e-5. The weights after AdamW are not compared: Adam turns gradients at rounding level (those same biases)
    into steps of +-lr whose sign is the rounding's.
    """
    (loss_e, grads_e, state_e, _), (loss_g, grads_g, state_g, _) = expected, got
    assert abs(loss_g.item() - loss_e.item()) <= RTOL * abs(loss_e.item())
    flat_e = torch.cat([g.flatten() for g in grads_e.values()])
    flat_g = torch.cat([grads_g[n].flatten() for n in grads_e])
    assert _rel(flat_g, flat_e) <= grad_rtol
    scale = flat_e.abs().max().item()
    for n, g in grads_e.items():
        if ".conv_" in n and n.endswith(".bias"):
            assert (grads_g[n] - g).abs().max().item() <= RTOL * scale, n
        else:
            assert _rel(grads_g[n], g) <= tensor_rtol, n
    for k, v in state_e.items():
        if "running" in k:
            assert _rel(state_g[k], v) <= RTOL, k
        elif "num_batches_tracked" in k:
            assert torch.equal(state_g[k], v), k


# The channels_last path is not held to 1e-5: PyTorch's channels-last BatchNorm kernel on CPU computes the batch
# statistics less accurately than its default-layout kernel (one BatchNorm3d, float32 against float64: output
# 9.5e-6 against 1.4e-7 relative, weight gradient 1.5e-5 against 9.2e-7, on one thread; 3.9e-6 on two), and
# 17 of them in a row move the whole gradient by up to 5.5e-4 relative on one thread (2.7e-6 on two). Measured
# against a float64 step, the default layout's gradient is off by 1.2e-6, the channels_last one by 5.5e-4.
CL_GRAD_RTOL, CL_TENSOR_RTOL = 2e-3, 1e-2


@pytest.fixture
def x() -> torch.Tensor:
    # Batch 2, non-cubic, and large enough that the last stage's BatchNorms see 16 values per channel (at 2, the
    # batch variance is so ill-conditioned that float rounding alone moves some gradients by 1e-4).
    return torch.rand(2, 1, 96, 128, 96)


def test_grad_checkpointing_step_equals_plain(x):
    plain = _model()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    bn_calls = []
    ckpt.stages[0].blocks[0].mixer.norm_d.register_forward_hook(lambda *a: bn_calls.append(1))
    _assert_identical_step(_step(plain, x), _step(ckpt, x))
    assert len(bn_calls) == 2  # the block really was recomputed in backward, and its running stats kept


def test_grad_checkpointing_only_in_training_with_grad(x):
    model = _model()
    model.set_grad_checkpointing()
    calls = []
    model.stem[1].norm_d.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)[-1].sum().backward()
    assert len(calls) == 2  # no recomputation in either call


def test_channels_last_step_equals_plain(x):
    plain = _model()
    fast = copy.deepcopy(plain)
    fast.set_channels_last()
    result = _step(fast, x)
    _assert_same_step(_step(plain, x), result, CL_GRAD_RTOL, CL_TENSOR_RTOL)
    features = fast.forward_features(x)
    assert all(f.is_contiguous(memory_format=torch.channels_last_3d) for f in features)


def test_channels_last_and_checkpointing_together_equal_plain(x):
    plain = _model()
    both = copy.deepcopy(plain)
    both.set_channels_last()
    both.set_grad_checkpointing()
    _assert_same_step(_step(plain, x), _step(both, x), CL_GRAD_RTOL, CL_TENSOR_RTOL)


def test_bf16_autocast_step_is_close():
    """bf16 autocast (the GPU recipe's mixed precision), on whichever device this runs: close at bf16 precision."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.rand(2, 1, 48, 64, 40, device=device)
    plain = _model().to(device)
    amp = copy.deepcopy(plain)
    dtypes = set()
    for m in amp.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    loss_e, grads_e, _, _ = _step(plain, x)
    loss_g, grads_g, _, _ = _step(amp, x, autocast=True)
    assert dtypes == {torch.bfloat16}  # autocast really ran the channel MLPs in bf16
    assert abs(loss_g.item() - loss_e.item()) <= 5e-2 * abs(loss_e.item())
    flat_e = torch.cat([g.flatten() for g in grads_e.values()])
    flat_g = torch.cat([g.flatten().float() for g in grads_g.values()])
    assert torch.isfinite(flat_g).all()
    assert torch.nn.functional.cosine_similarity(flat_e, flat_g, dim=0) > 0.99


def test_grad_checkpointing_round_trips_through_config_json(tmp_path):
    model = med3dvlm.create_model("dcformer_test", grad_checkpointing=True)
    assert model.config.grad_checkpointing
    model.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())["grad_checkpointing"] is True
    assert from_pretrained(tmp_path / "a").config.grad_checkpointing is True

    plain = med3dvlm.create_model("dcformer_test")
    assert plain.config.grad_checkpointing is False
    plain.set_grad_checkpointing()
    plain.set_channels_last()
    plain.save_pretrained(tmp_path / "b")
    again = from_pretrained(tmp_path / "b")
    assert again.config.grad_checkpointing is True
    assert again.channels_last is False  # a runtime layout, not part of the model


def test_train_config_switches_reach_the_encoder():
    clip = med3dvlm.create_model("clip_dcformer_test")
    apply_speed_options(clip, TrainConfig(grad_checkpointing=True, channels_last=True))
    assert clip.vision.config.grad_checkpointing and clip.vision.channels_last
    other = med3dvlm.create_model("dcformer_test")
    apply_speed_options(other, TrainConfig())
    assert not other.config.grad_checkpointing and not other.channels_last


def test_stage1_recipe_switches_give_the_same_losses(tmp_path):
    """Stage 1 through the recipe: `train.grad_checkpointing` and `train.channels_last` change no logged loss."""
    cap_json = tiny_phantom(tmp_path / "phantom")

    def run(name: str, **switches) -> tuple[list[float], Path]:
        recipe = {
            "model": {"name": "clip_dcformer_test", "overrides": {"vision_overrides": {"input_size": [16, 32, 32]}}},
            "data": {"cap_json": str(cap_json), "image_size": [16, 32, 32]},
            "train": {"output_dir": str(tmp_path / name), "lr": 1e-3, "max_steps": 3, "batch_size": 4, "log_every": 1,
                      "progress": False, "log_with": None, "save_every": 0, **switches},
            "eval": {"split": None},
        }
        summary = train_clip(recipe)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["train/loss"] for line in lines], Path(summary["vision_dir"])

    plain, _ = run("plain")
    fast, vision = run("fast", grad_checkpointing=True, channels_last=True)
    assert len(plain) == len(fast) == 3
    for a, b in zip(plain, fast):
        assert abs(a - b) <= RTOL * abs(a)
    assert json.loads((vision / "config.json").read_text())["grad_checkpointing"] is True
