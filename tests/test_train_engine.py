"""The generic training loop: learning, schedule, parameter groups, atomic checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from med3dvlm.train import TrainConfig, Trainer, default_param_groups, latest_checkpoint, list_checkpoints
from med3dvlm.train.config import RecipeError, load_recipe, section_from_dict

sys.path.insert(0, str(Path(__file__).parent))
import toy_train_task as toy  # noqa: E402

SCRIPT = Path(__file__).parent / "toy_train_task.py"
COMPLETE = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"}


def _script(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), str(out), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_loss_falls_and_schedule_warms_up_then_decays(tmp_path: Path) -> None:
    result = toy.run(str(tmp_path), steps=40, save_every=0)
    losses = [h["train/loss"] for h in result.history]
    lrs = [h["train/lr"] for h in result.history]
    assert result.completed and result.global_step == 40
    assert losses[-1] < 0.4 * losses[0]
    assert max(lrs) <= 1e-2 + 1e-12 and lrs[-1] == pytest.approx(0.0, abs=1e-9)  # cosine to zero
    assert lrs == sorted(lrs, reverse=True)  # after the 4 warmup steps the logged lrs only decrease
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5 * i for i in range(1, 9)]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000040"]  # saved at exit even with save_every=0


def test_no_weight_decay_for_vectors_and_scalars() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.0)))
    model[1].weight.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = default_param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert sorted(p.numel() for p in no_decay["params"]) == [1, 4, 4] and no_decay["weight_decay"] == 0.0


def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path: Path) -> None:
    steps = ["--steps", "30", "--accum", "2", "--save-every", "5"]
    subprocess.run(_script(tmp_path / "straight", *steps), check=True, env=_env(), timeout=120)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_script(out, *steps, "--sleep", "0.01"), env=_env())
    deadline = time.time() + 90
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step-00000010":  # type: ignore[union-attr]
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final.safetensors").exists()
    for ckpt in list_checkpoints(out):  # whatever survived the kill is complete
        assert COMPLETE <= {p.name for p in ckpt.iterdir()}
    killed_at = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["global_step"]  # type: ignore[operator]
    assert 10 <= killed_at < 30

    subprocess.run(_script(out, *steps, "--resume"), check=True, env=_env(), timeout=120)
    a, b = load_file(tmp_path / "straight" / "final.safetensors"), load_file(out / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{k} differs after resume")


def test_sigterm_checkpoints_at_the_next_step_and_stops(tmp_path: Path) -> None:
    proc = subprocess.Popen(_script(tmp_path, "--steps", "400", "--save-every", "1000", "--sleep", "0.01"), env=_env())
    deadline = time.time() + 60
    while not (tmp_path / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and COMPLETE <= {p.name for p in ckpt.iterdir()}
    assert 5 <= json.loads((ckpt / "trainer_state.json").read_text())["global_step"] < 400


def test_interrupted_save_never_looks_like_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=8, save_every=2, log_with=None, progress=False)
    trainer = Trainer(toy.ToyTask(), toy.NoisyLine(), config)
    real_save = trainer.accelerator.save_state
    calls = {"n": 0}

    def crash_on_second_save(path: str, **kw):
        calls["n"] += 1
        real_save(path, **kw)
        if calls["n"] == 2:
            raise RuntimeError("disk full")  # files are on disk, the checkpoint is not finished

    monkeypatch.setattr(trainer.accelerator, "save_state", crash_on_second_save)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.train()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000004", "step-00000002"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"  # type: ignore[union-attr]

    result = Trainer(toy.ToyTask(), toy.NoisyLine(), config).train(resume=True)
    assert result.completed and result.global_step == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # temporary removed, keep_last=1


def test_recipe_overrides_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-4\n  epochs: 2\n")
    recipe = load_recipe(path, ["train.lr=3e-4", "train.betas=[0.9, 0.95]", "data.limit=8"])
    cfg = section_from_dict(TrainConfig, recipe["train"], where=str(path))
    assert cfg.lr == pytest.approx(3e-4) and cfg.betas == (0.9, 0.95) and cfg.epochs == 2
    assert recipe["data"] == {"limit": 8}
    assert section_from_dict(TrainConfig, {"lr": "1e-4"}).lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as text
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key\(s\) learning_rate"):
        section_from_dict(TrainConfig, {"learning_rate": 1.0}, where=str(path))
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(path, ["train.lr"])
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_trainers_with_different_settings_in_one_process(tmp_path: Path) -> None:
    for i, (accum, precision) in enumerate([(2, "bf16"), (1, "no")]):
        config = TrainConfig(output_dir=str(tmp_path / str(i)), max_steps=2, batch_size=8, grad_accum=accum,
                             mixed_precision=precision, save_every=0, log_with=None, progress=False)
        trainer = Trainer(toy.ToyTask(), toy.NoisyLine(), config)
        assert trainer.accelerator.gradient_accumulation_steps == accum
        assert trainer.accelerator.mixed_precision == precision
        assert trainer.train().global_step == 2


def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_length_batches() -> None:
    from med3dvlm.train.engine import EpochSampler

    lengths = [float(i % 7) * 10 + (i % 3) for i in range(200)]
    sampler = EpochSampler(200, seed=3, lengths=lengths, batch_size=4)
    order = list(sampler)
    assert sorted(order) == list(range(200)) and order == list(EpochSampler(200, seed=3, lengths=lengths, batch_size=4))
    sampler.set_epoch(1)
    assert list(sampler) != order
    spread = lambda idx: sum(max(lengths[i] for i in idx[k:k + 4]) - min(lengths[i] for i in idx[k:k + 4]) for k in range(0, 200, 4))  # noqa: E731
    plain = list(EpochSampler(200, seed=3))
    assert spread(order) < 0.25 * spread(plain)  # batches hold items of similar length
