"""Stages 2 and 3 end to end on a tiny phantom dataset: freezing, LoRA, loss, save, merge."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import med3dvlm
from med3dvlm.cli import main
from med3dvlm.data.preprocess import PreprocessSpec
from med3dvlm.models.vlm import Med3DVLM, has_lora
from med3dvlm.train.vlm import StageSection, VLMModelSection, VLMTask, build_vlm_model, set_trainable


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from med3dvlm.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(out, n=4, seed=0, size=(64, 64, 64), progress=False)
    return out


def _recipe(tmp_path, phantom, tokenizer_dir, stage, data=None, **model):
    recipe = {
        "model": {"name": "med3dvlm_test", "tokenizer": str(tokenizer_dir), **model},
        "data": {"cap_json": str(phantom / "M3D_Cap.json"), "vqa_csv": str(phantom / "M3D-VQA" / "M3D_VQA_train.csv"),
                 "yes_no_csv": str(phantom / "M3D-VQA" / "M3D_VQA_yn_train.csv") if stage == 3 else None,
                 "limit": 6, "augment": False, **(data or {})},
        "stage": {"stage": stage},
        "train": {"output_dir": str(tmp_path / f"stage{stage}"), "lr": 3e-3, "epochs": 3, "batch_size": 4,
                  "save_every": 0, "log_every": 1, "log_with": None, "progress": False, "warmup_ratio": 0.0},
    }
    path = tmp_path / f"stage{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_freezing_per_stage(tiny_tokenizer):
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer))
    set_trainable(model, StageSection(stage=2))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    task = VLMTask(model).train()
    assert not model.vision.training and model.projector.training  # the frozen encoder stays in eval mode

    set_trainable(model, StageSection(stage=3))
    assert has_lora(model.llm)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(n.startswith("projector.") for n in names)
    assert not any(n.startswith("vision.") or "embed_tokens" in n or "lm_head" in n for n in names)
    lora_targets = set(model.llm.peft_config["default"].target_modules)
    assert lora_targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    original = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer))
    set_trainable(original, StageSection(stage=3, original_code=True))
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    assert any(n.startswith("vision.") for n in names) and any("embed_tokens" in n for n in names)


def test_stage3_can_fine_tune_the_encoder_gently(tiny_tokenizer):
    """vision_lr_scale: the encoder trains at its own lr, its BatchNorm statistics stay those of stage 1."""
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer))
    set_trainable(model, StageSection(stage=3, vision_lr_scale=0.1))
    task = VLMTask(model, vision_lr_scale=0.1).train()
    vision_ids = {id(p) for p in model.vision.parameters()}
    groups = task.param_groups(0.05)
    assert {id(p) for g in groups if g["lr_scale"] == 0.1 for p in g["params"]} == vision_ids
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    norms = [m for m in model.vision.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms) and model.vision.training
    before = [m.running_mean.clone() for m in norms]
    batch = model.processor.collate([model.processor.encode_example("Which organ?", "Liver")])
    out = model(images=torch.rand(1, 1, 64, 64, 64), **batch)
    out.loss.backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())


def test_stage1_encoder_brings_its_stored_preprocessing(tmp_path):
    spec = PreprocessSpec.m3d((64, 64, 64), hu_window="soft_tissue")
    med3dvlm.create_model("dcformer_test", preprocess=spec.to_dict()).save_pretrained(tmp_path / "vision")
    model = build_vlm_model(VLMModelSection(name="med3dvlm_test", vision_from=str(tmp_path / "vision")))
    assert PreprocessSpec.for_model(model.vision.config) == spec


def test_stage2_then_stage3_then_merge(tmp_path, phantom, tiny_tokenizer):
    tok_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)

    hu_window = {"level": 50, "width": 350}  # the phantom's images' display window, stored for raw HU input
    assert main(["train", "vlm", "--config", str(_recipe(tmp_path, phantom, tok_dir, 2, {"hu_window": hu_window}))]) == 0
    stage2 = tmp_path / "stage2" / "model"
    first_model = med3dvlm.from_pretrained(stage2)
    assert isinstance(first_model, Med3DVLM) and not has_lora(first_model.llm)
    stored = PreprocessSpec.for_model(first_model.vision.config)
    assert stored == PreprocessSpec.m3d((64, 64, 64), hu_window=hu_window)
    history = [json.loads(line) for line in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert losses[-1] < losses[0], losses

    assert main(["train", "vlm", "--config", str(_recipe(tmp_path, phantom, tok_dir, 3, init_from=str(stage2)))]) == 0
    stage3 = tmp_path / "stage3" / "model"
    assert (stage3 / "lora" / "adapter_config.json").is_file()
    tuned = med3dvlm.from_pretrained(stage3)
    assert has_lora(tuned.llm)

    assert main(["merge-lora", str(stage3), "--out", str(tmp_path / "merged")]) == 0
    merged = med3dvlm.from_pretrained(tmp_path / "merged")
    assert not has_lora(merged.llm) and not (tmp_path / "merged" / "lora").exists()
    # Stage 3's recipe names no window: the one stored by stage 2 stays, through the merge too.
    assert PreprocessSpec.for_model(tuned.vision.config) == PreprocessSpec.for_model(merged.vision.config) == stored
    batch = tuned.processor.generation_batch(["Which organ is abnormal?"])
    images = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        a = tuned(images=images, **batch).logits
        b = merged(images=images, **batch).logits
    assert (a - b).abs().max() < 1e-4


def test_stage3_continues_from_a_saved_stage3_model(tmp_path, tiny_tokenizer):
    """A saved adapter comes back frozen from peft; continuing stage 3 from it must train it again."""
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer))
    set_trainable(model, StageSection(stage=3))
    model.save_pretrained(tmp_path / "stage3a")
    again = set_trainable(med3dvlm.from_pretrained(tmp_path / "stage3a"), StageSection(stage=3))
    names = [n for n, p in again.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert not any("base_layer" in n or "embed_tokens" in n for n in names)


def test_data_section_selects_question_types_and_forms(phantom):
    from med3dvlm.train.vlm import VLMDataSection, build_dataset

    vqa = phantom / "M3D-VQA"
    section = VLMDataSection(cap_json=None, vqa_csv=str(vqa / "M3D_VQA_train.csv"), yes_no_csv=str(vqa / "M3D_VQA_yn_train.csv"),
                             vqa_modes=("closed",), question_types=(1, 2), augment=False)
    dataset = build_dataset(section, 3, (64, 64, 64), seed=0)
    assert len(dataset.datasets) == 2  # closed questions and yes/no; no open-ended copy
    closed, yes_no = dataset.datasets
    assert closed.mode == "closed" and set(closed.rows["Question Type"]) == {1, 2}
    assert set(yes_no.rows["Question Type"]) == {1, 2} and set(yes_no.rows["Answer"]) <= {"Yes", "No"}
    everything = build_dataset(VLMDataSection(cap_json=None, vqa_csv=str(vqa / "M3D_VQA_train.csv"), augment=False), 3, (64, 64, 64), 0)
    assert [p.mode for p in everything.datasets] == ["closed", "open"]
    assert set(everything.datasets[0].rows["Question Type"]) == {1, 2, 3, 4, 5}


def test_training_attention_kernel_is_used_and_not_saved(tmp_path, phantom, tiny_tokenizer, monkeypatch):
    """`model.llm_attention: eager` runs training through the eager kernel; the saved model keeps its own."""
    from transformers.models.llama import modeling_llama

    calls = []
    eager = modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    tok_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)
    assert main(["train", "vlm", "--config", str(_recipe(tmp_path, phantom, tok_dir, 2, llm_attention="eager"))]) == 0
    assert calls, "training did not run the eager attention kernel"
    saved = tmp_path / "stage2" / "model"
    assert "eager" not in (saved / "llm" / "config.json").read_text()
    assert med3dvlm.from_pretrained(saved).llm.config._attn_implementation == "sdpa"


def test_frozen_weights_cast_once_give_the_same_bits(tmp_path, phantom, tiny_tokenizer, monkeypatch):
    """bf16 stage 3 with the frozen linear weights cast once (`train.cast_frozen_once`, the default) logs the
    same losses and saves the same fp32 weights as with autocast casting them at every step."""
    from safetensors.torch import load_file

    from med3dvlm.train import precision
    from med3dvlm.train import vlm as stages23

    tok_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tok_dir)
    made = []
    real = precision.frozen_linear_copies
    monkeypatch.setattr(precision, "frozen_linear_copies", lambda *a: made.append(len(real(*a))) or real(*a))

    def run(name: str, cast_once: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        recipe = yaml.safe_load(_recipe(tmp_path, phantom, tok_dir, 3).read_text())
        recipe["train"].update(output_dir=str(tmp_path / name), mixed_precision="bf16", epochs=1, max_steps=4,
                               cast_frozen_once=cast_once)
        stages23.main(recipe)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]
        weights = {}
        for f in sorted((tmp_path / name / "model").rglob("*.safetensors")):
            weights.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
        return losses, weights

    every_step, saved_a = run("every_step", False)
    assert made == []
    once, saved_b = run("once", True)
    assert len(made) == 1 and made[0] > 10  # the base LLM's linear layers were swapped for copies
    assert len(once) == 4 and once == every_step
    assert saved_a.keys() == saved_b.keys()
    assert all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
    assert any("lora_B" in k and saved_b[k].abs().sum() > 0 for k in saved_b)  # LoRA did train
    assert all(v.dtype == torch.float32 for v in saved_b.values() if v.is_floating_point())


def test_frozen_linear_copies_leave_a_tied_embedding_in_fp32():
    from torch.func import functional_call

    from med3dvlm.train.precision import frozen_linear_copies

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 8)
            self.trained = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight
            self.embed.requires_grad_(False)
            self.proj.requires_grad_(False)

        def forward(self, ids):
            self.seen = self.embed(ids).dtype
            return self.head(self.trained(self.proj(self.embed(ids))))

    model = Tied()
    copies = frozen_linear_copies(model, torch.bfloat16)
    assert sorted(copies) == ["head.weight", "proj.bias", "proj.weight"]  # not the trained layer
    ids = torch.arange(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids)
        got = functional_call(model, copies, (ids,), tie_weights=False, strict=False)
    assert model.seen == torch.float32 and torch.equal(got, want)
    assert model.embed.weight.dtype == model.head.weight.dtype == torch.float32
