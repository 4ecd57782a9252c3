"""`med3dvlm train clip` end to end on a tiny phantom dataset: checkpoints, saved model + vision encoder, eval, resume."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from med3dvlm.cli import main as cli
from med3dvlm.data.preprocess import PreprocessSpec
from med3dvlm.hub import from_pretrained
from med3dvlm.models.clip import Contrastive3D
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.train import list_checkpoints
from med3dvlm.train.clip import ClipRecipe, ContrastiveTask
from med3dvlm.train.config import RecipeError, load_recipe
from med3dvlm.train.vlm import VLMRecipe

sys.path.insert(0, str(Path(__file__).parent))
from launch_helpers import free_port, run_killable  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from clip_helpers import tiny_phantom  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def cap_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_phantom(tmp_path_factory.mktemp("phantom"))


def _recipe(tmp_path: Path, cap_json: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"""
model:
  name: clip_dcformer_test
  overrides: {{vision_overrides: {{input_size: [16, 32, 32]}}}}
data: {{cap_json: {cap_json}, image_size: [16, 32, 32]}}
train:
  output_dir: {tmp_path / "run"}
  lr: 1.0e-3
  weight_decay: 0.1
  max_steps: 4
  batch_size: 4
  save_every: 2
  keep_last: 2
  log_every: 1
  progress: false
eval: {{split: test, sizes: [100], batch_size: 4}}
"""
    )
    return path


def test_train_clip_cli_end_to_end(tmp_path: Path, cap_json: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, cap_json)
    assert cli(["train", "clip", "--config", str(recipe)]) == 0
    summary = json.loads(capsys.readouterr().out)
    run = tmp_path / "run"
    assert summary["completed"] and summary["global_step"] == 4
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert any((run / "logs").rglob("events.out.tfevents.*"))  # TensorBoard

    model = from_pretrained(run / "model")
    vision = from_pretrained(run / "vision")
    assert isinstance(model, Contrastive3D) and isinstance(vision, DCFormer)
    for k, v in vision.state_dict().items():  # the encoder alone equals the trained model's encoder
        torch.testing.assert_close(v, model.vision.state_dict()[k])
    assert (run / "model" / "tokenizer.json").is_file()

    result = json.loads((run / "eval" / "retrieval.json").read_text())["test"]
    n = result["pairs"]
    assert list(result["by_size"]) == [str(n)]  # fewer than 100 test pairs: all of them are used
    assert (run / "eval" / "recall_at_k.png").stat().st_size > 0

    # Resuming a finished run changes nothing and trains no further.
    before = (run / "model" / "model.safetensors").read_bytes()
    assert cli(["train", "clip", "--config", str(recipe), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 4
    assert (run / "model" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("command", ["clip", "vlm"])
def test_train_commands_keep_stdout_for_their_json(tmp_path: Path, cap_json: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    # DeepSpeed's logger writes to stdout (a "[WARNING] ... Setting accelerator to CPU" line when it is first
    # imported), which broke `json.loads` of the summary for anyone with the deepspeed extra installed.
    import logging

    import med3dvlm.train.clip
    import med3dvlm.train.vlm

    def noisy_main(recipe, resume=False):
        print("[WARNING] a library talking")
        chatty = logging.getLogger("chatty-library")
        # Bound to stdout as it is when the handler is made; monkeypatch restores the handlers, pass or fail.
        monkeypatch.setattr(chatty, "handlers", [logging.StreamHandler(sys.stdout)])
        chatty.warning("still talking")
        return {"completed": True, "global_step": 1}

    monkeypatch.setattr(med3dvlm.train.clip if command == "clip" else med3dvlm.train.vlm, "main", noisy_main)
    recipe = _recipe(tmp_path, cap_json)
    assert cli(["train", command, "--config", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"completed": True, "global_step": 1}
    assert "a library talking" in err and "still talking" in err


def test_overrides_reach_the_run_and_typos_fail(tmp_path: Path, cap_json: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path, cap_json)
    code = cli(["train", "clip", "--config", str(recipe), "--set", "train.max_steps=1", "--set", "eval.split=null",
                "--set", "data.limit=4", "--set", "data.hu_window=lung", "-o", str(tmp_path / "other")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["global_step"] == 1 and "eval" not in summary and summary["output_dir"] == str(tmp_path / "other")
    # The window of the training images is stored with both saved models, for raw HU input at inference.
    expected = PreprocessSpec.m3d((16, 32, 32), hu_window="lung")
    for saved in ("model", "vision"):
        assert PreprocessSpec.for_model(from_pretrained(tmp_path / "other" / saved).config) == expected
    assert cli(["train", "clip", "--config", str(recipe), "--set", "train.learning_rate=1"]) == 1
    assert "unknown key(s) learning_rate" in capsys.readouterr().err


def test_shipped_recipes_parse() -> None:
    paper = ClipRecipe.from_dict(load_recipe(CONFIGS / "clip_paper.yaml"))
    assert (paper.train.lr, paper.train.weight_decay, paper.train.warmup_ratio) == (1e-4, 0.1, 0.03)
    assert (paper.train.batch_size, paper.train.epochs, paper.train.mixed_precision) == (64, 100, "bf16")
    assert paper.train.deepspeed == "configs/zero2.json" and (CONFIGS / "zero2.json").is_file()
    json.loads((CONFIGS / "zero2.json").read_text())
    cpu = ClipRecipe.from_dict(load_recipe(CONFIGS / "clip_cpu.yaml"))
    assert cpu.train.mixed_precision == "no" and cpu.train.deepspeed is None
    # Every shipped recipe stores the display window of its 8-bit images (phantom: abdomen/chest W400/L40).
    assert paper.data.hu_window == cpu.data.hu_window == "soft_tissue"
    for name in ("vlm_stage2_cpu", "vlm_stage3_cpu", "vlm_stage2_paper", "vlm_stage3_paper"):
        assert VLMRecipe.from_dict(load_recipe(CONFIGS / f"{name}.yaml")).data.hu_window == "soft_tissue"
    with pytest.raises(RecipeError, match="unknown key"):
        ClipRecipe.from_dict({"modle": {}})


def test_text_lr_scale_groups() -> None:
    from med3dvlm.registry import create_model

    model = create_model("clip_dcformer_test")
    task = ContrastiveTask(model, model.loss_fn(), text_lr_scale=0.1)
    groups = task.param_groups(0.1)
    text_ids = {id(p) for p in model.text.parameters()}
    scaled = [p for g in groups if g["lr_scale"] == 0.1 for p in g["params"]]
    assert {id(p) for p in scaled} == text_ids
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _torchrun_clip(recipe: Path, *overrides: str) -> tuple[int, str]:
    """(exit code, stderr) of `torchrun --nproc_per_node 2 med3dvlm train clip` on this CPU (gloo)."""
    bindir = Path(sys.executable).parent
    torchrun, med3dvlm = shutil.which("torchrun", path=str(bindir)), shutil.which("med3dvlm", path=str(bindir))
    assert torchrun and med3dvlm, f"torchrun and the med3dvlm script belong in {bindir}"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), med3dvlm, "train", "clip", "--config", str(recipe),
           *[arg for o in overrides for arg in ("--set", o)]]
    return run_killable(cmd, env, timeout=180)


def test_two_process_cpu_run_finishes(tmp_path: Path, cap_json: Path) -> None:
    """Both ranks train, the main one saves, the final barrier holds; too few samples per process is an error.

    Accelerate's `end_training()` used to be called after training, which destroys the process group before the
    stage's own closing `wait_for_everyone()`: every multi-process run failed at its end. And with fewer samples
    than one batch per process, every epoch was empty and the loop never ended.
    """
    recipe = _recipe(tmp_path, cap_json)
    code, stderr = _torchrun_clip(recipe, "train.max_steps=2", "train.batch_size=2", "train.log_with=tensorboard")
    assert code == 0, stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "model" / "config.json").is_file() and (run / "vision" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    # 7 training items, batch 4: one batch in all, none left for each of the 2 processes.
    code, stderr = _torchrun_clip(recipe, "train.max_steps=2", f"train.output_dir={tmp_path / 'run_small'}")
    assert code != 0 and "got no batch" in stderr and "lower train.batch_size" in stderr, stderr[-3000:]
