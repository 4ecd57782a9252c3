"""Released DCFormer_SigLIP (original `DEC_CLIP`) weights convert into Contrastive3D with equal embeddings.

The original state dict is assembled here with the original parameter names: the vision tower is the
original DCFormer-nano of tests/assets (weights and outputs computed by the original Med3DVLM code), the text
tower a tiny DistilBERT (the original's ClinicalBERT class), plus `mm_vision_proj`, `mm_language_proj`,
`t_prime` and `bias`. The reference embeddings follow the original `encode_image` / `encode_text`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, DistilBertConfig

from med3dvlm.convert import convert_dcformer_checkpoint
from med3dvlm.convert.siglip import convert_siglip_checkpoint, convert_siglip_state_dict, infer_distilbert_config
from med3dvlm.data.preprocess import PreprocessSpec
from med3dvlm.losses import SigLipLoss
from med3dvlm.models.clip import Contrastive3D

EMBED = 24
TOKENS = torch.tensor([[101, 2053, 11325, 102, 0, 0], [101, 1037, 2312, 3742, 1999, 102]])
MASK = (TOKENS != 0).long()


def _original(assets, loss: str = "sigmoid"):
    """(state dict with original names, reference image embedding, reference text embeddings, input volume)."""
    vision = load_file(str(assets / "original-dcformer-nano" / "original_state_dict.safetensors"))
    io = load_file(str(assets / "original-dcformer-nano" / "input_and_outputs.safetensors"))
    torch.manual_seed(7)
    text_cfg = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=40)
    language_encoder = AutoModel.from_config(text_cfg).eval()
    mm_vision_proj = nn.Linear(256, EMBED)  # nano's last stage has 256 channels
    mm_language_proj = nn.Linear(32, EMBED)
    sd = {f"vision_encoder.{k}": v for k, v in vision.items()}
    sd.update({f"language_encoder.{k}": v for k, v in language_encoder.state_dict().items()})
    sd.update({f"mm_vision_proj.{k}": v for k, v in mm_vision_proj.state_dict().items()})
    sd.update({f"mm_language_proj.{k}": v for k, v in mm_language_proj.state_dict().items()})
    if loss == "sigmoid":
        sd["t_prime"], sd["bias"] = torch.tensor(math.log(1 / 0.07) + 0.3), torch.tensor(-2.5)
    else:
        sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # used as the multiplier itself by the original
    with torch.no_grad():
        # Original encode_image: last hidden state (B, N, C) -> mean over tokens -> Linear -> L2 normalize.
        image_ref = F.normalize(mm_vision_proj(io["stage4"].mean(dim=1)), dim=-1)
        # Original encode_text: last_hidden_state[:, 0] -> Linear -> L2 normalize.
        hidden = language_encoder(TOKENS, attention_mask=MASK)["last_hidden_state"]
        text_ref = F.normalize(mm_language_proj(hidden[:, 0]), dim=-1)
    return sd, image_ref, text_ref, io["input"], text_cfg


def test_converted_model_reproduces_original_embeddings(assets) -> None:
    sd, image_ref, text_ref, volume, _ = _original(assets)
    model = convert_siglip_checkpoint(sd, n_heads=2)
    assert isinstance(model, Contrastive3D)
    assert model.config.vision == "dcformer_nano" and model.config.vision_overrides == {}
    assert model.config.loss == "siglip" and model.config.embed_dim == EMBED
    with torch.no_grad():
        image = model.encode_image(volume)
        text = model.encode_text(TOKENS, MASK)
    assert (image - image_ref).abs().max() < 1e-4
    assert (text - text_ref).abs().max() < 1e-5
    # Temperature and bias: the original's sigmoid path uses exp(t_prime) and bias.
    assert model.logit_scale.exp().item() == pytest.approx(math.exp(sd["t_prime"].item()))
    assert model.logit_bias.item() == pytest.approx(-2.5)


def test_converted_round_trip_and_siglip_loss(assets, tmp_path) -> None:
    sd, image_ref, text_ref, volume, _ = _original(assets)
    model = convert_siglip_checkpoint(sd, n_heads=2)
    model.save_pretrained(tmp_path)
    loaded = Contrastive3D.from_pretrained(tmp_path)
    # The search index and /embed read this spec: M3D's min-max, after a soft-tissue window for raw HU.
    assert PreprocessSpec.for_model(loaded.config) == PreprocessSpec.m3d(model.config.input_size, hu_window="soft_tissue")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(TOKENS, MASK), model.encode_text(TOKENS, MASK))
        out = loaded(volume.expand(2, -1, -1, -1, -1), TOKENS, MASK)
    # The original distributed sigmoid loss (symmetrized logits, exp(t'), sum / N) on the same embeddings.
    img2 = image_ref.expand(2, -1)
    logits = (img2 @ text_ref.T) * math.exp(sd["t_prime"].item()) + sd["bias"].item()
    logits = (logits + logits.T) / 2
    labels = 2 * torch.eye(2) - 1
    original_loss = -F.logsigmoid(labels * logits).sum() / 2
    ours = SigLipLoss(symmetric_logits=True)(**out)
    assert ours.item() == pytest.approx(original_loss.item(), abs=1e-4)


def test_inferred_text_config_and_clip_variant(assets) -> None:
    sd, _, _, _, text_cfg = _original(assets, loss="nce")
    text_sd = {k[len("language_encoder."):]: v for k, v in sd.items() if k.startswith("language_encoder.")}
    inferred = infer_distilbert_config(text_sd, n_heads=2)
    assert inferred == dict(
        model_type="distilbert", vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=40
    )
    model = convert_siglip_checkpoint(sd, text_config=inferred)
    assert model.config.loss == "clip" and model.logit_bias is None
    # The original multiplies by its logit_scale directly; we multiply by exp(ours).
    assert model.logit_scale.exp().item() == pytest.approx(math.log(1 / 0.07))


def test_vision_overrides_for_unregistered_depths(assets, tmp_path) -> None:
    sd, _, _, volume, _ = _original(assets)
    # A second block in stage 1 (a copy of block 0 without its downsampling): no registered variant matches.
    extra = {
        k.replace("vision_encoder.encoder.s1.0.", "vision_encoder.encoder.s1.1."): v.clone()
        for k, v in sd.items()
        if k.startswith("vision_encoder.encoder.s1.0.") and ".proj." not in k
    }
    model = convert_siglip_checkpoint({**sd, **extra}, n_heads=2)
    assert model.config.vision == "dcformer_small"
    assert model.vision.config.depths == (2, 1, 1, 1) and model.vision.config.dims == (32, 64, 128, 256)
    reference = convert_dcformer_checkpoint({k: v for k, v in {**sd, **extra}.items() if k.startswith("vision_encoder.")})
    with torch.no_grad():
        torch.testing.assert_close(model.vision(volume)[-1], reference(volume)[-1])
    model.save_pretrained(tmp_path)  # the overrides go through config.json
    assert Contrastive3D.from_pretrained(tmp_path).vision.config == model.vision.config


def test_bad_state_dicts_are_clear_errors(assets) -> None:
    sd, _, _, _, _ = _original(assets)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_siglip_state_dict({**sd, "something_else": torch.zeros(1)})
    with pytest.raises(ValueError, match="vision"):
        convert_siglip_state_dict({k: v for k, v in sd.items() if not k.startswith("vision_encoder.")})
    with pytest.raises(ValueError, match="divisible"):
        convert_siglip_checkpoint(sd, n_heads=5)
