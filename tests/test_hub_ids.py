"""Hub repo ids wherever a model is loaded, offline from a hub cache on disk (HF_HUB_OFFLINE=1, see conftest),
for our format and both released layouts; the download patterns; the model card every save writes."""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import med3dvlm
from med3dvlm import hub
from med3dvlm.cli import main as cli
from med3dvlm.convert.siglip import convert_siglip_checkpoint
from med3dvlm.inference import Predictor
from med3dvlm.models.clip import Contrastive3D
from med3dvlm.models.vlm import Med3DVLM

from .hub_cache import put_in_hub_cache
from .test_released_vlm import _write_released

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import hu_phantom, tiny_vlm_dir, write_nifti  # noqa: E402

OURS = "med3dvlm-tests/tiny-vlm"
RELEASED_VLM = "MagicXin/Med3DVLM-Qwen-2.5-7B"
RELEASED_CLIP = "MagicXin/DCFormer_SigLIP"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported; make sure, whatever imported it first.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    local = tiny_vlm_dir(root / "local" / "tiny-vlm", tiny_tokenizer)
    put_in_hub_cache(root / "cache", OURS, local)
    return {"root": root, "cache": root / "cache", "local": local}


def _released_clip_folder(folder: Path, assets: Path) -> dict[str, torch.Tensor]:
    """A folder as the original `DEC_CLIP.save_pretrained` leaves it, at toy width (DCFormer nano, 2-layer DistilBERT)."""
    from transformers import AutoModel, DistilBertConfig

    torch.manual_seed(3)
    vision = load_file(str(assets / "original-dcformer-nano" / "original_state_dict.safetensors"))
    text = AutoModel.from_config(DistilBertConfig(vocab_size=30522, dim=48, n_layers=2, n_heads=12, hidden_dim=64,
                                                  max_position_embeddings=40)).eval()
    sd = {f"vision_encoder.{k}": v for k, v in vision.items()}
    sd.update({f"language_encoder.{k}": v for k, v in text.state_dict().items()})
    sd.update({"mm_vision_proj.weight": torch.randn(24, 256), "mm_vision_proj.bias": torch.randn(24),
               "mm_language_proj.weight": torch.randn(24, 48), "mm_language_proj.bias": torch.randn(24),
               "t_prime": torch.tensor(math.log(1 / 0.07)), "bias": torch.tensor(-1.0)})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dec_clip", "architectures": ["DEC_CLIP"], "vision_encoder": "dcformer",
        "input_size": [256, 256, 128], "hidden_size": 24, "loss_type": "sigmoid",
        "language_model_name_or_path": "medicalai/ClinicalBERT", "max_text_len": 40,
    }))
    # The original also saves the vision tower alone; loading never needs it.
    torch.save(vision, folder / "pretrained_ViT.bin")
    return sd


def test_our_format_from_a_hub_id_offline(cache: dict[str, Path]) -> None:
    from_id = med3dvlm.from_pretrained(OURS, cache_dir=cache["cache"])
    local = med3dvlm.from_pretrained(cache["local"])
    assert isinstance(from_id, Med3DVLM)
    a, b = from_id.state_dict(), local.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The class method takes ids too, and says when the id holds another kind of model.
    assert isinstance(Med3DVLM.from_pretrained(OURS, cache_dir=cache["cache"], local_files_only=True), Med3DVLM)
    with pytest.raises(TypeError, match="holds a Med3DVLM, not a Contrastive3D"):
        Contrastive3D.from_pretrained(OURS, cache_dir=cache["cache"])


def test_offline_and_not_cached_names_the_id_and_the_fix(cache: dict[str, Path]) -> None:
    with pytest.raises(FileNotFoundError) as err:
        med3dvlm.from_pretrained("someone/not-cached", cache_dir=cache["cache"])
    message = str(err.value)
    assert "someone/not-cached" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download someone/not-cached" in message and str(cache["cache"]) in message
    with pytest.raises(FileNotFoundError, match="at revision 'v2'"):
        med3dvlm.from_pretrained(OURS, revision="v2", cache_dir=cache["cache"])
    # A path that does not exist and cannot be an id is reported as a missing folder.
    with pytest.raises(FileNotFoundError, match="no such folder"):
        med3dvlm.from_pretrained(cache["root"] / "nowhere" / "deeper" / "model")


def test_released_med3dvlm_from_a_hub_id(tmp_path: Path, tiny_tokenizer) -> None:
    folder = tmp_path / "released"
    folder.mkdir()
    tok, original_logits = _write_released(folder, tiny_tokenizer)
    put_in_hub_cache(tmp_path / "cache", RELEASED_VLM, folder)
    model = med3dvlm.from_pretrained(RELEASED_VLM, cache_dir=tmp_path / "cache")
    assert isinstance(model, Med3DVLM) and model.config.splice == "original"
    ids = tok("Describe the findings", return_tensors="pt").input_ids
    ids = torch.cat([ids[:, :1], torch.full((1, model.num_image_tokens), model.config.image_token_id), ids[:, 1:]], 1)
    image = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        ours = model(images=image, input_ids=ids).logits
        assert (ours - original_logits(ids, image)).abs().max() < 1e-4


def test_released_dcformer_siglip_from_a_hub_id(tmp_path: Path, assets: Path) -> None:
    sd = _released_clip_folder(tmp_path / "released", assets)
    put_in_hub_cache(tmp_path / "cache", RELEASED_CLIP, tmp_path / "released")
    model = med3dvlm.from_pretrained(RELEASED_CLIP, cache_dir=tmp_path / "cache")
    reference = convert_siglip_checkpoint(sd, n_heads=12)
    assert isinstance(model, Contrastive3D) and model.config.loss == "siglip"
    assert model.config.text_config["n_heads"] == 12 and model.config.max_text_length == 40
    volume = torch.rand(1, 1, 32, 32, 32)
    tokens = torch.tensor([[101, 7, 9, 102]])
    with torch.no_grad():
        assert torch.allclose(model.encode_image(volume), reference.encode_image(volume))
        assert torch.allclose(model.encode_text(tokens, torch.ones_like(tokens)), reference.encode_text(tokens, torch.ones_like(tokens)))


def test_download_patterns_fetch_only_what_the_layout_reads(tmp_path: Path, assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake hub that applies allow_patterns like snapshot_download: no duplicate .bin parts, no optimizer states."""
    import huggingface_hub

    remote = tmp_path / "remote"
    _released_clip_folder(remote, assets)
    (remote / "training_args.bin").write_bytes(b"x")
    (remote / "optimizer.pt").write_bytes(b"x")
    local = tmp_path / "snapshot"
    calls: list[list[str]] = []

    def fake_snapshot(repo_id: str, allow_patterns: list[str], **kwargs) -> str:
        calls.append(list(allow_patterns))
        for path in remote.rglob("*"):
            rel = path.relative_to(remote).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                (local / rel).write_bytes(path.read_bytes())
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hub.resolve_model_dir(RELEASED_CLIP) == local
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]
    # A released repo with pickled weights only gets pytorch_model.bin, still not the vision tower copy.
    (remote / "model.safetensors").unlink()
    torch.save(load_file(str(local / "model.safetensors")), remote / "pytorch_model.bin")
    (local / "model.safetensors").unlink()
    hub.resolve_model_dir(RELEASED_CLIP)
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert isinstance(med3dvlm.from_pretrained(local), Contrastive3D)
    assert all("*.bin" not in patterns for patterns in calls)


def test_cli_and_predictor_take_a_hub_id(cache: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache["cache"]))
    scan = write_nifti(tmp_path / "scan.nii.gz", hu_phantom(seed=2))
    predictor = Predictor.from_dir(OURS)
    assert predictor.model_name == OURS
    capsys.readouterr()
    assert cli(["predict", "-m", OURS, "-i", str(scan), "--max-new-tokens", "4", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == OURS and result["text"] == predictor.predict(scan, max_new_tokens=4).text
    assert cli(["predict", "-m", "someone/not-cached", "-i", str(scan)]) == 1
    assert "hf download someone/not-cached" in capsys.readouterr().err


def test_save_pretrained_writes_a_model_card(cache: dict[str, Path], tmp_path: Path) -> None:
    card = (cache["local"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: med3dvlm\n")
    model = med3dvlm.from_pretrained(cache["local"])
    assert f"parameters: {model.num_parameters():,}" in card and "model_type `vlm`" in card
    assert "## Preprocessing" in card and "## Training\n\nNot recorded." in card
    # Only the outermost save writes one: the VLM's sub-folders are parts, not models to publish.
    assert not (cache["local"] / "vision" / "README.md").exists()
    # A model saved by a training run carries the run's recipe and metrics.
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({"train": {"lr": 0.0001, "epochs": 100}}))
    (run / "metrics.json").write_text(json.dumps({"IR_1@100": 0.42}))
    encoder = med3dvlm.create_model("dcformer_test", preprocess={"size": [64, 64, 64], "intensity": "window", "window": "soft_tissue"})
    encoder.save_pretrained(run / "model")
    card = (run / "model" / "README.md").read_text()
    assert '"lr": 0.0001' in card and '"IR_1@100": 0.42' in card and '"window": "soft_tissue"' in card
    assert f"parameters: {encoder.num_parameters():,}" in card
    assert isinstance(med3dvlm.from_pretrained(run / "model"), type(encoder))
