"""DeepSpeed ZeRO-2 through Accelerate on 2 CPU processes (gloo) trains exactly like the unsharded run.

Stage 3 (tiny `med3dvlm_test`, LoRA + projector) is compared with one process that accumulates the same two
micro-batches per step: its frozen encoder runs in eval mode, so nothing couples the samples of a batch and
the two runs compute the same thing. Stage 1 is compared with plain DDP on the same 2 processes instead:
DCFormer's BatchNorm normalises over each process's own micro-batch, so no single process reproduces a
2-process stage-1 run, sharded or not (measured: step-1 loss 9.81 on 2 x 2 samples, 10.29 on 1 x 4).

What equal means here (measured on this CPU: losses to 1e-6 relative, weights to 8e-6 absolute at lr 3e-3):
losses per step to rtol 1e-5, every saved tensor to atol 5e-5 / rtol 1e-4. Biases whose gradient is zero in
exact arithmetic are left out, as Adam turns the float noise in their gradients into lr-sized steps of random
sign, which the next layer removes: DCFormer's convolution biases (a BatchNorm follows each) and the
projector's token-MLP output bias (the LayerNorm over channels that follows removes a per-token constant).

Each run is a subprocess (`torchrun --nproc_per_node 2 med3dvlm train ...`), about 25 s each here; the test
skips only when DeepSpeed (the optional `deepspeed` extra) is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import tiny_phantom  # noqa: E402
from launch_helpers import free_port, run_killable  # noqa: E402

pytestmark = pytest.mark.slow

ZERO2 = str(Path(__file__).parents[1] / "configs" / "zero2.json")
# Parameters with an exactly-zero gradient (see the module docstring).
GRADIENT_FREE = re.compile(r"(\.conv_[dhw]\.bias|token_mlp\.fc2\.bias)$")
LOSS_RTOL = 1e-5
WEIGHT_ATOL, WEIGHT_RTOL = 5e-5, 1e-4


@pytest.fixture(autouse=True)
def _needs_deepspeed() -> None:
    # Imported here, not at collection, so runs that deselect `slow` never import DeepSpeed.
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional extra: pip install -c constraints.txt deepspeed")


def _run(stage: str, recipe: Path, *overrides: str, processes: int = 2, ddp: bool = False, resume_from: Path | None = None) -> None:
    """`med3dvlm train <stage>`: under torchrun on `processes` CPU processes, or alone when `processes` is 1."""
    bindir = Path(sys.executable).parent
    med3dvlm = shutil.which("med3dvlm", path=str(bindir))
    assert med3dvlm, f"the med3dvlm script belongs in {bindir}"
    # CPU only: DeepSpeed's CPU accelerator, no GPU for Accelerate to pick. ACCELERATE_USE_CPU selects plain DDP
    # (Accelerate ignores DeepSpeed in that mode, which the trainer refuses when train.deepspeed is set).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    if ddp:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [med3dvlm]
    if processes > 1:
        torchrun = shutil.which("torchrun", path=str(bindir))
        assert torchrun, f"torchrun belongs in {bindir}"
        cmd = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(free_port()), med3dvlm]
    cmd += ["train", stage, "--config", str(recipe), *[arg for o in overrides for arg in ("--set", o)]]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    code, stderr = run_killable(cmd, env, timeout=300)
    assert code == 0, stderr[-4000:]


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines)}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        out.update({f"{f.parent.relative_to(model_dir)}/{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights under {model_dir}"
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and la
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=LOSS_RTOL), (step, la, lb)
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert wa.keys() == wb.keys()
    compared = [k for k in wa if not GRADIENT_FREE.search(k)]
    assert len(compared) > 0.8 * len(wa)
    for k in compared:
        torch.testing.assert_close(wa[k], wb[k], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m, k=k: f"{k}: {m}")


def _assert_zero2_shards(checkpoint: Path) -> None:
    """The checkpoint was written by DeepSpeed's ZeRO stage-2 optimizer, its fp32 weights and Adam state split in two."""
    shards = checkpoint / "pytorch_model"
    model_states = torch.load(shards / "mp_rank_00_model_states.pt", weights_only=False)  # our own file, just written
    assert model_states["dp_world_size"] == 2 and model_states["ds_config"]["zero_optimization"]["stage"] == 2
    trainable = [sum(shape.numel() for shape in group.values()) for group in model_states["param_shapes"]]
    held = []
    for rank in (0, 1):
        optim = torch.load(shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
        assert int(optim["zero_stage"]) == 2 and optim["partition_count"] == [2] * len(trainable)
        # This rank's slice of the fp32 weights (saved without the alignment padding of the last rank's slice).
        part = [t.numel() for t in optim["single_partition_of_fp32_groups"]]
        exp_avg = [s["exp_avg"].numel() for s in optim["base_optimizer_state"]["state"].values()]
        assert exp_avg == [n + pad for n, pad in zip(part, optim["group_paddings"])]  # Adam's moments: that slice only
        held.append(part)
    for group, total in enumerate(trainable):
        assert held[0][group] + held[1][group] == total and 0 < held[0][group] < total


def test_stage1_zero2_equals_ddp(tmp_path: Path) -> None:
    cap_json = tiny_phantom(tmp_path / "phantom")
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "clip_dcformer_test", "overrides": {"vision_overrides": {"input_size": [16, 32, 32]}}},
        "data": {"cap_json": str(cap_json), "image_size": [16, 32, 32]},
        "train": {"lr": 1e-3, "weight_decay": 0.1, "max_steps": 3, "batch_size": 2, "save_every": 0, "log_every": 1,
                  "progress": False, "log_with": None},
        "eval": {"split": None},
    }))
    zero, ddp = tmp_path / "zero2", tmp_path / "ddp"
    _run("clip", recipe, f"train.output_dir={zero}", f"train.deepspeed={ZERO2}")
    _run("clip", recipe, f"train.output_dir={ddp}", ddp=True)
    _assert_zero2_shards(zero / "checkpoints" / "step-00000003")
    assert not (ddp / "checkpoints" / "step-00000003" / "pytorch_model").exists()  # the reference is not sharded
    assert sorted(_losses(zero)) == [1, 2, 3]
    _assert_same_training(zero, ddp)
    assert (zero / "vision" / "model.safetensors").is_file()  # stage 1 saved both of its results


def test_stage3_zero2_equals_one_process_and_resumes(tmp_path: Path, tiny_tokenizer) -> None:
    from med3dvlm.data.phantom import write_phantom_dataset

    phantom = tmp_path / "phantom"
    write_phantom_dataset(phantom, n=4, seed=0, size=(64, 64, 64), progress=False)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    recipe = tmp_path / "stage3.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "med3dvlm_test", "tokenizer": str(tmp_path / "tokenizer")},
        "data": {"cap_json": str(phantom / "M3D_Cap.json"), "vqa_csv": str(phantom / "M3D-VQA" / "M3D_VQA_train.csv"),
                 "yes_no_csv": str(phantom / "M3D-VQA" / "M3D_VQA_yn_train.csv"), "limit": 8, "augment": False},
        "stage": {"stage": 3, "lora_dropout": 0.0},  # no random masks, which would differ between the two layouts
        "train": {"lr": 3e-3, "max_steps": 4, "batch_size": 2, "save_every": 2, "keep_last": 2, "log_every": 1,
                  "log_with": None, "progress": False, "warmup_ratio": 0.0},
    }))
    zero, single, resumed = tmp_path / "zero2", tmp_path / "single", tmp_path / "resumed"
    _run("vlm", recipe, f"train.output_dir={zero}", f"train.deepspeed={ZERO2}")
    # The same global batch of 4: 2 processes x 2, or one process accumulating 2 micro-batches of 2.
    _run("vlm", recipe, f"train.output_dir={single}", "train.grad_accum=2", processes=1)
    for step in (2, 4):
        _assert_zero2_shards(zero / "checkpoints" / f"step-0000000{step}")
    assert sorted(_losses(zero)) == [1, 2, 3, 4]
    _assert_same_training(zero, single)
    lora = _weights(zero / "model")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # LoRA did train

    # Resuming the sharded run from its step-2 checkpoint (every rank loads its own shard) ends where it ended.
    _run("vlm", recipe, f"train.output_dir={resumed}", f"train.deepspeed={ZERO2}",
         resume_from=zero / "checkpoints" / "step-00000002")
    assert sorted(_losses(resumed)) == [3, 4]
    for step in (3, 4):
        assert _losses(resumed)[step] == pytest.approx(_losses(zero)[step], rel=LOSS_RTOL)
    again = _weights(resumed / "model")
    for k in lora:
        torch.testing.assert_close(again[k], lora[k], atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=lambda m, k=k: f"{k}: {m}")
