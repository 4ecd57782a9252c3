"""A checkpoint in the released Med3DVLM-Qwen-2.5-7B layout loads through `from_pretrained`, without
trust_remote_code, and gives the original model's logits (tiny Qwen2, original parameter names)."""

from __future__ import annotations

import copy
import json

import torch
from safetensors.torch import save_file

import med3dvlm
from med3dvlm.data.preprocess import PreprocessSpec
from med3dvlm.models.vlm import Med3DVLM

from .original_reference import OrigMixerProjector, OrigModel, randomize_batchnorm

ENCODER = dict(stem=8, dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), kernels=(5, 5, 3, 3))
VOLUME = (64, 64, 64)  # stage 3: 2x2x2 = 8 tokens x 16, stage 4: 1 token x 32


def _write_released(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<im_patch>"]})
    qwen_cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False)
    llm = Qwen2ForCausalLM(qwen_cfg).eval()
    vision = randomize_batchnorm(OrigModel(**ENCODER))
    projector = OrigMixerProjector((8, 16), (6, 4), (1, 32), (2, 4), 64).eval()

    state = {k: v for k, v in llm.state_dict().items()}
    state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vision.state_dict().items()})
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    config = qwen_cfg.to_dict()
    config.update(model_type="vlm_qwen", architectures=["VLMQwenForCausalLM"], vision_tower="dcformer",
                  mm_projector_type="mixer", input_size=[64, 64, 64], low_output_size=[6, 4], high_output_size=[2, 4],
                  proj_out_num=8, mm_mlp_depth=2, vision_select_layer=-2, vision_select_feature="cls_patch",
                  low_input_size=[8, 16], high_input_size=[1, 32], mm_hidden_size=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(tmp_path)

    def original_logits(input_ids, image):
        feats = projector(vision(image)[-2:])
        embeds = llm.get_input_embeddings()(input_ids)
        n = feats.shape[1]
        embeds = torch.cat([embeds[:, :1], feats, embeds[:, n + 1:]], dim=1)  # the original's fixed splice
        return llm(inputs_embeds=embeds).logits

    return tok, original_logits


def test_released_layout_gives_the_original_logits(tmp_path, tiny_tokenizer):
    tok, original_logits = _write_released(tmp_path, tiny_tokenizer)
    model = med3dvlm.from_pretrained(tmp_path)
    assert isinstance(model, Med3DVLM) and model.config.splice == "original"
    assert model.num_image_tokens == 8 and model.vision.config.input_size == VOLUME
    # Trained on windowed 8-bit slices: raw HU gets the soft-tissue window before the min-max.
    assert PreprocessSpec.for_model(model.vision.config) == PreprocessSpec.m3d(VOLUME, hu_window="soft_tissue")

    # the original's prompt: 8 image tokens, then " " + question, no BOS
    text = "<im_patch>" * 8 + " Which organ is abnormal?"
    input_ids = tok(text, return_tensors="pt").input_ids
    image = torch.rand(1, 1, *VOLUME)
    with torch.no_grad():
        expected = original_logits(input_ids, image)
        got = model(input_ids=input_ids, images=image).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4

    # and it can be saved in our format and loaded back unchanged
    model.save_pretrained(tmp_path / "ours")
    again = med3dvlm.from_pretrained(tmp_path / "ours")
    assert again.vision.config.preprocess == model.vision.config.preprocess
    with torch.no_grad():
        assert (again(input_ids=input_ids, images=image).logits - expected).abs().max() < 1e-4


def test_original_splice_batches_generation_one_by_one(tmp_path, tiny_tokenizer):
    _write_released(tmp_path, tiny_tokenizer)
    model = med3dvlm.from_pretrained(tmp_path)
    proc = model.processor
    questions = ["Which organ is abnormal?", "Is there a lesion in the liver?"]
    images = torch.rand(2, 1, *VOLUME)
    together = model.generate(images, **proc.generation_batch(questions), max_new_tokens=6, do_sample=False)
    for i, q in enumerate(questions):
        single = model.generate(images[i:i + 1], **proc.generation_batch([q]), max_new_tokens=6, do_sample=False)
        assert together[i, : single.shape[1]].tolist() == single[0].tolist()
