"""The fast greedy decoder (models.decoding) gives Hugging Face generate's tokens, and takes only calls it can."""

from __future__ import annotations

import copy

import pytest
import torch

import med3dvlm
from med3dvlm.models import decoding
from med3dvlm.models.llm import TINY_LLAMA
from med3dvlm.models.vlm import Med3DVLM

QUESTIONS = ["Which organ is abnormal?", "Is there a cyst in the left kidney or the liver?", "Describe.",
             "What plane is this image in, axial or coronal?"]

TINY_QWEN2 = {
    "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 512, "tie_word_embeddings": False,
    "initializer_range": 0.2,
}


def _model(tokenizer, llm_config=None) -> Med3DVLM:
    overrides = {} if llm_config is None else {"llm_config": dict(llm_config)}
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test", **overrides), tokenizer=copy.deepcopy(tokenizer)).eval()
    for p in model.projector.parameters():  # image features that visibly steer the text
        p.data.mul_(3)
    return model


@pytest.fixture(scope="module")
def llama_vlm(tiny_tokenizer):
    return _model(tiny_tokenizer, TINY_LLAMA)


@pytest.fixture(scope="module")
def qwen2_vlm(tiny_tokenizer):
    return _model(tiny_tokenizer, TINY_QWEN2)


@pytest.fixture(params=["llama", "qwen2"])
def vlm(request, llama_vlm, qwen2_vlm):
    """Both families (Qwen2: biased projections, one key/value head, an untied head) where the layer arithmetic
    matters; the decoding rules are tested on Llama alone."""
    return llama_vlm if request.param == "llama" else qwen2_vlm


def _both(model, images, batch, monkeypatch, **kwargs):
    """(fast tokens, Hugging Face tokens); the fast call fails if it silently went through llm.generate."""
    reference = model.generate(images, **batch, fast=False, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(model.llm, "generate", lambda *a, **k: pytest.fail("fast path fell back to llm.generate"))
        fast = model.generate(images, **batch, **kwargs)
    return fast, reference


def test_batch_one_is_token_identical(vlm, monkeypatch):
    batch = vlm.processor.generation_batch(QUESTIONS[:1])
    images = torch.rand(1, 1, 64, 64, 64)
    fast, ref = _both(vlm, images, batch, monkeypatch, max_new_tokens=24, do_sample=False, eos_token_id=[])
    assert ref.shape == (1, 24)
    assert fast.tolist() == ref.tolist()


def test_left_padded_batch_is_token_identical(vlm, monkeypatch):
    batch = vlm.processor.generation_batch(QUESTIONS)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    images = torch.rand(len(QUESTIONS), 1, 64, 64, 64)
    fast, ref = _both(vlm, images, batch, monkeypatch, max_new_tokens=20, do_sample=False, eos_token_id=[])
    assert fast.tolist() == ref.tolist()
    # and each row is what the row gives alone: padding does not leak into real positions
    for i, q in enumerate(QUESTIONS):
        alone = vlm.generate(images[i:i + 1], **vlm.processor.generation_batch([q]), max_new_tokens=20, eos_token_id=[])
        assert alone[0].tolist() == fast[i].tolist()


def test_eos_stops_rows_and_pads_them(vlm, monkeypatch):
    batch = vlm.processor.generation_batch(QUESTIONS)
    images = torch.rand(len(QUESTIONS), 1, 64, 64, 64)
    free = vlm.generate(images, **batch, max_new_tokens=16, fast=False, eos_token_id=[])
    # An eos each row reaches at a different step: a token from the middle of row 0 (and one from row 1).
    eos = [int(free[0, 5]), int(free[1, 9])]
    pad = 3
    fast, ref = _both(vlm, images, batch, monkeypatch, max_new_tokens=16, eos_token_id=eos, pad_token_id=pad)
    assert fast.tolist() == ref.tolist()
    assert fast.shape[1] <= 16 and (fast[0, 6:] == pad).all()
    # every row finished early: the call stops at the last eos, not at max_new_tokens
    stop = [int(free[i, 0]) for i in range(len(QUESTIONS))]
    fast, ref = _both(vlm, images, batch, monkeypatch, max_new_tokens=16, eos_token_id=stop, pad_token_id=pad)
    assert fast.shape == ref.shape == (len(QUESTIONS), 1) and fast.tolist() == ref.tolist()


def test_finished_rows_leave_the_batch(llama_vlm, monkeypatch):
    """A row that produced its eos is no longer computed, and the others' tokens (penalty included) stay HF's."""
    batch = llama_vlm.processor.generation_batch(QUESTIONS)
    images = torch.rand(len(QUESTIONS), 1, 64, 64, 64)
    free = llama_vlm.generate(images, **batch, max_new_tokens=16, fast=False, eos_token_id=[], repetition_penalty=1.3)
    eos = [int(free[0, 2]), int(free[2, 6])]
    rows_seen: list[int] = []
    embed = llama_vlm.llm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    try:
        fast, ref = _both(llama_vlm, images, batch, monkeypatch, max_new_tokens=16, eos_token_id=eos, pad_token_id=3,
                          repetition_penalty=1.3)
    finally:
        hook.remove()
    assert fast.tolist() == ref.tolist()
    steps = fast.shape[1]
    first_eos = [next((t for t in range(steps) if int(fast[i, t]) in eos), steps) for i in range(len(QUESTIONS))]
    assert min(first_eos) < steps - 1, "no row finished early; the test needs other eos tokens"
    # The embedding runs on the prompt, then once per step on the rows still decoding after the token just chosen.
    # The fast call ran last, so its calls are the last `steps` ones.
    expected = [len(QUESTIONS)] + [sum(e > t for e in first_eos) for t in range(steps - 1)]
    assert rows_seen[-steps:] == expected


def test_min_new_tokens_and_repetition_penalty(llama_vlm, monkeypatch):
    batch = llama_vlm.processor.generation_batch(QUESTIONS)
    images = torch.rand(len(QUESTIONS), 1, 64, 64, 64)
    free = llama_vlm.generate(images, **batch, max_new_tokens=8, fast=False, eos_token_id=[])
    eos = [int(free[i, 0]) for i in range(len(QUESTIONS))]  # would end every row at once
    fast, ref = _both(llama_vlm, images, batch, monkeypatch, max_new_tokens=12, min_new_tokens=5, eos_token_id=eos,
                      pad_token_id=3)
    assert fast.shape[1] >= 5 and fast.tolist() == ref.tolist()
    # 60 tokens: with 20 a random tiny model sometimes repeats no token at all, and the penalty has nothing to act on.
    fast, ref = _both(llama_vlm, images, batch, monkeypatch, max_new_tokens=60, eos_token_id=[], repetition_penalty=1.5)
    plain = llama_vlm.generate(images, **batch, max_new_tokens=60, eos_token_id=[])
    assert fast.tolist() == ref.tolist()
    assert fast.tolist() != plain.tolist()  # the penalty really acted


def test_max_new_tokens_one_and_default_eos(llama_vlm, monkeypatch):
    batch = llama_vlm.processor.generation_batch(QUESTIONS[:2])
    images = torch.rand(2, 1, 64, 64, 64)
    fast, ref = _both(llama_vlm, images, batch, monkeypatch, max_new_tokens=1, do_sample=False)
    assert fast.shape == (2, 1) and fast.tolist() == ref.tolist()
    fast, ref = _both(llama_vlm, images, batch, monkeypatch, max_new_tokens=10)  # the tokenizer's eos, as generate_text
    assert fast.tolist() == ref.tolist()


def test_generate_text_and_streaming_use_the_fast_path(llama_vlm, monkeypatch):
    images = torch.rand(2, 1, 64, 64, 64)
    ref = llama_vlm.generate_text(images, ["Which organ is abnormal?", None], max_new_tokens=10)
    monkeypatch.setattr(llama_vlm.llm, "generate", lambda *a, **k: pytest.fail("fast path fell back to llm.generate"))
    assert llama_vlm.generate_text(images, ["Which organ is abnormal?", None], max_new_tokens=10) == ref
    streamed = "".join(llama_vlm.stream_text(images[:1], "Which organ is abnormal?", max_new_tokens=10))
    assert streamed.strip() == ref[0]


def test_lora_wrapped_llm_is_token_identical(tiny_tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_tokenizer)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    batch = model.processor.generation_batch(QUESTIONS)
    images = torch.rand(len(QUESTIONS), 1, 64, 64, 64)
    fast, ref = _both(model, images, batch, monkeypatch, max_new_tokens=12, eos_token_id=[])
    assert fast.tolist() == ref.tolist()


@pytest.mark.parametrize("kwargs", [
    {"do_sample": True},
    {"num_beams": 2},
    {"no_repeat_ngram_size": 2},
    {"output_scores": True, "return_dict_in_generate": True},
    {"logits_processor": []},
    {"max_new_tokens": None},
])
def test_what_the_fast_path_does_not_take(llama_vlm, kwargs):
    assert decoding.fast_greedy_plan(llama_vlm.llm, {"max_new_tokens": 4, **kwargs}) is None
    plan = decoding.fast_greedy_plan(llama_vlm.llm, {"max_new_tokens": 4, "do_sample": False, "temperature": None})
    assert plan is not None and plan.max_new_tokens == 4


def test_sampling_keeps_the_hugging_face_loop(llama_vlm, monkeypatch):
    called = []
    original = llama_vlm.llm.generate
    monkeypatch.setattr(llama_vlm.llm, "generate", lambda *a, **k: called.append(1) or original(*a, **k))
    llama_vlm.generate_text(torch.rand(1, 1, 64, 64, 64), [None], max_new_tokens=4, do_sample=True, seed=1)
    assert called
