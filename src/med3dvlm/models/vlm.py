"""The Med3DVLM vision-language model: 3D encoder -> projector -> any Hugging Face causal LM (LLaVA style).

Xin et al., "Med3DVLM: An Efficient Vision-Language Model for 3D Medical Image Analysis", IEEE JBHI 2025.

The prompt carries one `<im_patch>` token per projector output token; the image features are written into
the LLM's input embeddings at exactly those positions (`splice="token"`), and a count mismatch is an error.
`splice="original"` reproduces the released model instead: it overwrites positions 1..N whatever the tokens
are, which with Qwen's BOS-less tokenizer drops the first text token. It exists only so the released
weights run unchanged (see `med3dvlm.convert.med3dvlm`).

Saved as a directory: `config.json` (this config, including the LLM's HF config), `vision/` and
`projector/` in med3dvlm's format, `llm/` in the Hugging Face format with the tokenizer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..hub import CONFIG_NAME, PretrainedModel, from_pretrained, write_json_atomic
from ..prompts import IGNORE_INDEX, IMAGE_TOKEN, VLMProcessor, add_image_token
from ..registry import build_from_config, get_config, register_family, register_model
from .decoding import fast_greedy_plan, greedy_generate
from .llm import DEFAULT_LLM, KNOWN_LLM_CONFIGS, QWEN25_7B_INSTRUCT, SMOLLM2_135M, TINY_LLAMA, base_llm, load_llm  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

SPLICE_MODES = ("token", "original")


@dataclass
class VLMConfig(ModelConfig):
    model_type = "vlm"

    vision: str = "dcformer_small"  # registered encoder name
    vision_overrides: dict[str, Any] = field(default_factory=dict)
    projector: str = "mixer2x_h"  # registered projector name; its sizes are fitted to the encoder and LLM
    projector_overrides: dict[str, Any] = field(default_factory=dict)
    llm: str = DEFAULT_LLM  # LLM to load pretrained weights from (directory or hub id)
    llm_config: dict[str, Any] | None = None  # the LLM's HF config; when set, the LLM is built from it
    llm_layers: int | None = None  # keep only the first K decoder layers of the pretrained `llm` (fast CPU runs)
    image_token: str = IMAGE_TOKEN
    image_token_id: int | None = None
    splice: str = "token"  # one of SPLICE_MODES
    max_length: int = 512  # tokens per training example, image tokens included

    def __post_init__(self) -> None:
        if self.splice not in SPLICE_MODES:
            raise ValueError(f"splice must be one of {SPLICE_MODES}, got {self.splice!r}")


def build_llm_from_config(llm_config: dict[str, Any]) -> nn.Module:
    """A randomly initialised causal LM from a Hugging Face config dict (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(llm_config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoModelForCausalLM.from_config(hf_config)


def _encoder_token_shapes(vision_name: str, overrides: dict[str, Any]) -> list[tuple[int, int]]:
    """(tokens, channels) of each encoder output at the encoder's own input size, computed on meta."""
    config = get_config(vision_name, **overrides)
    with torch.device("meta"):
        encoder = build_from_config(config).eval()
        outputs = encoder(torch.empty(1, getattr(config, "in_channels", 1), *config.input_size))
    return [(o.shape[1], o.shape[2]) for o in outputs]


def projector_config_for(config: VLMConfig, llm_dim: int) -> ModelConfig:
    shapes = _encoder_token_shapes(config.vision, config.vision_overrides)
    if len(shapes) < 2:
        raise ValueError(f"encoder {config.vision} has one output; the projectors need its last two stages")
    (low_tokens, low_dim), (high_tokens, high_dim) = shapes[-2], shapes[-1]
    fitted = dict(llm_dim=llm_dim, low_dim=low_dim, high_dim=high_dim, low_tokens=low_tokens, high_tokens=high_tokens)
    return get_config(config.projector, **{**fitted, **config.projector_overrides})


@register_family(VLMConfig)
class Med3DVLM(PretrainedModel):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig, llm: nn.Module | None = None, tokenizer: Any = None) -> None:
        super().__init__(config)
        if llm is None:
            if config.llm_config is not None:
                llm = build_llm_from_config(config.llm_config)
            else:
                llm, loaded_tokenizer = load_llm(config.llm)
                tokenizer = tokenizer or loaded_tokenizer
                if config.llm_layers is not None:
                    truncate_decoder(llm, config.llm_layers)
        self.llm = llm
        self.vision = build_from_config(get_config(config.vision, **config.vision_overrides))
        self.projector = build_from_config(projector_config_for(config, self.llm.config.hidden_size))
        self.tokenizer: Any = None
        self.processor: VLMProcessor | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        config.llm_config = _llm_config_dict(self.llm)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer`: add the image token (its embedding = the mean of the others) and build the processor."""
        self.config.image_token_id = add_image_token(tokenizer, self.config.image_token)
        self._fit_embeddings(len(tokenizer))
        self.tokenizer = tokenizer
        self.processor = VLMProcessor(tokenizer, self.num_image_tokens, self.config.max_length, self.config.image_token)

    # -- construction helpers ------------------------------------------------------------------
    def _fit_embeddings(self, vocab_size: int) -> None:
        """Grow the LLM's embeddings to cover new tokens, new rows set to the mean of the old ones."""
        embeddings = self.llm.get_input_embeddings()
        old = embeddings.weight.shape[0]
        if vocab_size <= old:
            return  # Qwen pads its matrix past the tokenizer; unlike the original we never shrink it
        if embeddings.weight.is_meta:
            self.llm.resize_token_embeddings(vocab_size, mean_resizing=False)
            return
        self.llm.resize_token_embeddings(vocab_size, mean_resizing=False)
        with torch.no_grad():
            inp = self.llm.get_input_embeddings().weight
            inp[old:] = inp[:old].mean(dim=0, keepdim=True)
            out = self.llm.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != inp.data_ptr():
                out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_output_tokens

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ValueError("the model has no tokenizer yet, so the image token id is unknown")
        return self.config.image_token_id

    # -- forward -------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) volumes -> (B, num_image_tokens, llm hidden) features."""
        features = self.projector(self.vision(images))
        return features.to(self.llm.get_input_embeddings().weight.dtype)

    def embed_inputs(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features written in (see the module docstring)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if images is None:
            return embeds
        features = self.encode_images(images)
        n = features.shape[1]
        if self.config.splice == "original":
            if input_ids.shape[1] < n + 1:
                raise ValueError(f"sequence of {input_ids.shape[1]} tokens is shorter than 1 + {n} image positions")
            return torch.cat([embeds[:, :1], features, embeds[:, n + 1:]], dim=1)
        mask = input_ids == self.image_token_id
        counts = mask.sum(dim=1)
        if not bool((counts == n).all()):
            raise ValueError(
                f"each sequence needs exactly {n} {self.config.image_token} tokens (the projector's output), "
                f"got {counts.tolist()}"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """The LLM's output; with labels, `.loss` (mean over the tokens not labelled -100) and `.logits` only at the
        positions that predict a label, in order (the LM head over every position is a quarter of a step's work)."""
        embeds = self.embed_inputs(input_ids, images)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
        logits = out.logits.float()
        out.loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1),
                                               ignore_index=IGNORE_INDEX)
        return out

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        fast: bool = True,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids only. Prompts must be left-padded (see `VLMProcessor.generation_batch`).

        Greedy calls the fast decoder understands (`models.decoding`) run there, with the same tokens as
        `llm.generate`; sampling and anything else go to `llm.generate`. `fast=False` forces the latter.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.splice == "original" and input_ids.shape[0] > 1 and not bool(attention_mask.all()):
            # The original splice writes at fixed positions, which padding would shift: one at a time.
            outs = []
            for i in range(input_ids.shape[0]):
                keep = attention_mask[i].bool()
                outs.append(self.generate(images[i:i + 1], input_ids[i:i + 1, keep], None, fast, **generate_kwargs)[0])
            return _pad_right(outs, generate_kwargs.get("pad_token_id", self.tokenizer.pad_token_id))
        embeds = self.embed_inputs(input_ids, images)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id if self.tokenizer else None)
        if generate_kwargs.get("eos_token_id") is None and self.tokenizer is not None:
            # Training ends every answer with the tokenizer's eos; an LLM built from a bare config may name another.
            configured = getattr(self.llm.generation_config, "eos_token_id", None)
            ids = [configured] if isinstance(configured, int) else list(configured or [])
            generate_kwargs["eos_token_id"] = ids + [t for t in [self.tokenizer.eos_token_id] if t is not None and t not in ids]
        plan = fast_greedy_plan(self.llm, generate_kwargs) if fast else None
        if plan is not None:
            return greedy_generate(self.llm, embeds, attention_mask, plan)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def generate_text(
        self,
        images: torch.Tensor,
        questions: Sequence[str | None],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float | None = None,
        seed: int | None = None,
        streamer: Any = None,
    ) -> list[str]:
        """Answers for a batch of (1, D, H, W) volumes; a None question asks for the report.

        Greedy by default. The original evaluation sampled at temperature 1.0 (`do_sample=True`); `seed`
        makes sampling reproducible.
        """
        if self.processor is None:
            raise ValueError("the model has no tokenizer; load it with from_pretrained or call set_tokenizer")
        if len(questions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} volumes but {len(questions)} questions")
        prompts = [q if q is not None else self.processor.caption_prompt() for q in questions]
        batch = self.processor.generation_batch(prompts, caption=[q is None for q in questions])
        device = self.llm.get_input_embeddings().weight.device
        if seed is not None:
            torch.manual_seed(seed)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {"temperature": None, "top_p": None, "top_k": None}
        ids = self.generate(
            images.to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=do_sample, streamer=streamer, **sampling,
        )
        return self.processor.decode(ids)

    def stream_text(self, image: torch.Tensor, question: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the answer for one (1, 1, D, H, W) volume piece by piece while it is generated."""
        from threading import Thread

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = Thread(target=self.generate_text, args=(image, [question]), kwargs={**kwargs, "streamer": streamer})
        worker.start()
        yield from streamer
        worker.join()

    def merge_lora(self) -> "Med3DVLM":
        """Fold the LoRA weights into the LLM (a plain HF model again); no-op without LoRA."""
        if has_lora(self.llm):
            self.llm = self.llm.merge_and_unload()
        return self

    # -- saving and loading --------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.llm_config = _llm_config_dict(self.llm)
        self.vision.save_pretrained(directory / "vision")
        self.projector.save_pretrained(directory / "projector")
        if has_lora(self.llm):
            # The base weights without the LoRA layers in llm/, the adapter alone in lora/.
            base = self.llm.get_base_model()
            clean = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
            base.save_pretrained(directory / "llm", state_dict=clean)
            self.llm.save_pretrained(directory / "lora")
        else:
            self.llm.save_pretrained(directory / "llm")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / "llm")
        write_json_atomic(directory / CONFIG_NAME, self.config.to_dict())  # last: marks the directory complete
        return directory

    @classmethod
    def load_directory(cls, directory: str | os.PathLike, config: VLMConfig, dtype: torch.dtype = torch.float32) -> "Med3DVLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        for part in ("vision", "projector", "llm"):
            if not (directory / part).is_dir():
                raise FileNotFoundError(f"{directory / part}: missing; not a complete med3dvlm VLM directory")
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=dtype)
        if (directory / "lora").is_dir():
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, directory / "lora")
        tokenizer = AutoTokenizer.from_pretrained(directory / "llm")
        model = cls(config, llm=llm, tokenizer=tokenizer)
        model.vision = from_pretrained(directory / "vision")
        model.projector = from_pretrained(directory / "projector")
        return model.eval()


def truncate_decoder(llm: nn.Module, layers: int) -> nn.Module:
    """Keep the first `layers` decoder layers of a Hugging Face causal LM, in place (its config follows).

    Like training the first layers of a pretrained text tower: a shallower LLM for runs on a CPU. The saved
    config then says `num_hidden_layers=layers`, so the folder reloads as the truncated model.
    """
    blocks = llm.model.layers
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"llm_layers must be between 1 and {len(blocks)}, got {layers}")
    llm.model.layers = blocks[:layers]
    llm.config.num_hidden_layers = layers
    if getattr(llm.config, "layer_types", None):
        llm.config.layer_types = llm.config.layer_types[:layers]
    return llm


def has_lora(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config")


def _pad_right(rows: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _llm_config_dict(llm: nn.Module) -> dict[str, Any]:
    base = base_llm(llm)
    data = base.config.to_diff_dict() if hasattr(base.config, "to_diff_dict") else base.config.to_dict()
    data["model_type"] = base.config.model_type
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        data.pop(key, None)
    return data


@register_model
def med3dvlm_qwen7b() -> VLMConfig:
    """The paper's model: DCFormer-small, 2xMLP-Mixer-H, Qwen2.5-7B-Instruct (loaded from `llm`, a hub id or a
    local copy). `llm_config=QWEN25_7B_INSTRUCT` builds the architecture alone, e.g. on the meta device."""
    return VLMConfig(vision="dcformer_small", projector="mixer2x_h", llm="Qwen/Qwen2.5-7B-Instruct")


@register_model
def med3dvlm_smollm2() -> VLMConfig:
    """The embedded default: DCFormer-small, 2xMLP-Mixer-H and the offline SmolLM2-135M-Instruct."""
    return VLMConfig(vision="dcformer_small", projector="mixer2x_h", llm=DEFAULT_LLM)


@register_model
def med3dvlm_test() -> VLMConfig:
    """Tiny random model for tests: dcformer_test at 64^3, a small mixer, a 2-layer Llama."""
    return VLMConfig(vision="dcformer_test", projector="mixer2x_h_test", llm_config=dict(TINY_LLAMA), max_length=128)
