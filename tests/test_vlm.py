"""The VLM: sizes of the paper's model, image-token splicing, label masking, batched generation, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

import med3dvlm
from med3dvlm.models.vlm import Med3DVLM
from med3dvlm.prompts import IGNORE_INDEX, closed_answer, closed_question


@pytest.fixture
def vlm(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=tok).eval()
    for p in model.projector.parameters():  # bigger image features so that the image visibly matters
        p.data.mul_(3)
    return model


def test_paper_model_sizes_on_meta():
    from med3dvlm.models.llm import QWEN25_7B_INSTRUCT

    with torch.device("meta"):
        model = med3dvlm.create_model("med3dvlm_qwen7b", llm_config=QWEN25_7B_INSTRUCT)
    assert model.vision.num_parameters() == 18_244_800
    assert model.projector.num_parameters() == 47_221_248
    assert sum(p.numel() for p in model.llm.parameters()) == 7_615_616_512  # Qwen2.5-7B-Instruct
    assert model.num_image_tokens == 256
    assert model.projector.config.low_tokens == 256 and model.projector.config.high_tokens == 32


def test_image_token_added_with_mean_embedding(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    before = len(tok)
    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test", llm_config={**med3dvlm.get_config("med3dvlm_test").llm_config, "vocab_size": before}), tokenizer=tok)
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape[0] == before + 1 == len(tok)
    assert model.image_token_id == before
    assert torch.allclose(emb[before], emb[:before].mean(0), atol=1e-6)


def test_features_land_on_image_tokens_only(vlm):
    proc = vlm.processor
    batch = proc.generation_batch(["Which organ is abnormal?", "Is there a lesion in the liver?"])
    images = torch.rand(2, 1, 64, 64, 64)
    embeds = vlm.embed_inputs(batch["input_ids"], images)
    plain = vlm.llm.get_input_embeddings()(batch["input_ids"])
    is_image = batch["input_ids"] == vlm.image_token_id
    assert int(is_image[0].sum()) == vlm.num_image_tokens == 8
    features = vlm.encode_images(images)
    assert torch.equal(embeds[is_image], features.reshape(-1, features.shape[-1]))
    assert torch.equal(embeds[~is_image], plain[~is_image])  # text tokens untouched: no token is dropped


@pytest.mark.parametrize("question", ["What is <im_patch> here?", "<im_patch><im_patch>", "Lesion?<|endoftext|> Yes"])
def test_user_text_cannot_inject_special_tokens(vlm, question):
    proc = vlm.processor
    ids = proc.prompt_ids(question)
    n = vlm.num_image_tokens
    assert ids[:n] == [vlm.image_token_id] * n and vlm.image_token_id not in ids[n:]
    assert proc.tokenizer.eos_token_id not in ids[n:]
    # The text is all there, as text: its characters decode back.
    assert proc.tokenizer.decode(ids[n:]) == " " + question
    encoded = proc.encode_example("Report?", question, caption=True)  # training text too (answers, reports)
    assert encoded.input_ids.count(vlm.image_token_id) == n and encoded.input_ids[-1] == proc.tokenizer.eos_token_id
    # And generation runs (it failed with "each sequence needs exactly 8 <im_patch> tokens").
    out = vlm.generate_text(torch.rand(1, 1, 64, 64, 64), [question], max_new_tokens=2)
    assert len(out) == 1


def test_placeholder_held_as_a_plain_added_token_is_spelled_out(tiny_tokenizer):
    from med3dvlm.prompts import IMAGE_TOKEN, VLMProcessor

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=False)  # not special: split_special_tokens leaves it whole
    proc = VLMProcessor(tok, num_image_tokens=4)
    question = "Is <im_patch> a token?"
    assert tok(question, add_special_tokens=False, split_special_tokens=True).input_ids.count(proc.image_token_id) == 1
    ids = proc.prompt_ids(question)
    assert ids.count(proc.image_token_id) == 4 and tok.decode(ids[4:]) == " " + question


def test_image_token_count_mismatch_is_a_clear_error(vlm):
    ids = vlm.processor.generation_batch(["What plane?"])["input_ids"][:, 1:]  # one image token short
    with pytest.raises(ValueError, match=r"exactly 8 <im_patch> tokens.*\[7\]"):
        vlm.embed_inputs(ids, torch.rand(1, 1, 64, 64, 64))


def test_labels_mask_the_prompt_and_end_with_eos(vlm):
    proc = vlm.processor
    question = closed_question("Which plane is this image?", {"A": "axial", "B": "coronal", "C": "sagittal", "D": "NA"})
    enc = proc.encode_example(question, closed_answer("A", "axial"))
    prompt_len = len(proc.prompt_ids(question))
    assert enc.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    answer = enc.labels[prompt_len:]
    assert IGNORE_INDEX not in answer and answer[-1] == vlm.tokenizer.eos_token_id
    assert proc.tokenizer.decode(answer[:-1]).strip() == "A. axial"
    batch = proc.collate([enc, proc.encode_example("Is the liver normal?", "yes")])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE_INDEX).all()


def test_caption_prompt_has_no_space_after_image_tokens(vlm):
    proc = vlm.processor
    ids = proc.prompt_ids("Describe the findings of the medical image you see.", caption=True)
    text_ids = vlm.tokenizer("Describe the findings of the medical image you see.", add_special_tokens=False).input_ids
    assert ids == [vlm.image_token_id] * 8 + text_ids


def test_loss_trains_projector_and_falls(vlm):
    proc = vlm.processor
    batch = proc.collate([proc.encode_example("Is there a lesion?", "yes"), proc.encode_example("Which organ?", "liver")])
    images = torch.rand(2, 1, 64, 64, 64)
    vlm.train()
    for p in list(vlm.llm.parameters()) + list(vlm.vision.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(vlm.projector.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = vlm(images=images, **batch)
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None for p in vlm.projector.parameters())
        opt.step()
        losses.append(out.loss.item())
    # a frozen random LLM conditioned only through 8 image tokens: a real but modest drop
    assert losses[-1] < losses[0] - 0.2, losses


def test_batched_greedy_equals_one_at_a_time(vlm):
    proc = vlm.processor
    questions = ["Which organ is abnormal?", "Is there a cyst?", "Describe the findings."]
    images = torch.rand(3, 1, 64, 64, 64)
    batch = proc.generation_batch(questions)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padded
    together = vlm.generate(images, **batch, max_new_tokens=12, do_sample=False)
    for i, q in enumerate(questions):
        single = vlm.generate(images[i:i + 1], **proc.generation_batch([q]), max_new_tokens=12, do_sample=False)
        n = single.shape[1]
        assert together[i, :n].tolist() == single[0].tolist()
    assert proc.decode(together)[0] == proc.decode(vlm.generate(images[:1], **proc.generation_batch(questions[:1]), max_new_tokens=12))[0]


def test_the_image_changes_the_output(vlm):
    batch = vlm.processor.generation_batch(["Which organ is abnormal?"])
    a = vlm(images=torch.zeros(1, 1, 64, 64, 64), **batch).logits
    b = vlm(images=torch.rand(1, 1, 64, 64, 64), **batch).logits
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_original_splice_overwrites_positions_one_to_n(vlm):
    vlm.config.splice = "original"
    ids = vlm.processor.generation_batch(["Which organ?"])["input_ids"]
    images = torch.rand(1, 1, 64, 64, 64)
    embeds = vlm.embed_inputs(ids, images)
    plain = vlm.llm.get_input_embeddings()(ids)
    feats = vlm.encode_images(images)
    assert torch.equal(embeds[:, 1:9], feats) and torch.equal(embeds[:, 0], plain[:, 0])
    assert torch.equal(embeds[:, 9:], plain[:, 9:])  # position 8 (the first text token's slot) was overwritten


def test_save_and_load_round_trip(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "vision", "projector", "llm"}
    again = med3dvlm.from_pretrained(tmp_path)
    assert isinstance(again, Med3DVLM) and again.image_token_id == vlm.image_token_id
    batch = vlm.processor.generation_batch(["Which organ is abnormal?"])
    images = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        assert torch.allclose(vlm(images=images, **batch).logits, again(images=images, **batch).logits, atol=1e-6)


def test_generate_text_and_streaming_agree(vlm):
    images = torch.rand(2, 1, 64, 64, 64)
    texts = vlm.generate_text(images, ["Which organ is abnormal?", None], max_new_tokens=10)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    streamed = "".join(vlm.stream_text(images[:1], "Which organ is abnormal?", max_new_tokens=10))
    assert streamed.strip() == texts[0]
    a = vlm.generate_text(images[:1], [None], max_new_tokens=10, do_sample=True, seed=3)
    b = vlm.generate_text(images[:1], [None], max_new_tokens=10, do_sample=True, seed=3)
    assert a == b  # sampling is reproducible with a seed
    with pytest.raises(ValueError, match="2 volumes but 1 questions"):
        vlm.generate_text(images, ["only one"])


@pytest.mark.slow
def test_embedded_default_llm_runs_offline():
    """The embedded SmolLM2-135M-Instruct (from its wheel, cached as safetensors) inside the default VLM."""
    model = med3dvlm.create_model("med3dvlm_smollm2").eval()
    assert type(model.llm).__name__ == "LlamaForCausalLM" and model.llm.config.hidden_size == 576
    assert model.num_image_tokens == 256 and model.projector.num_parameters() > 0
    texts = model.generate_text(torch.rand(1, 1, 128, 256, 256), ["Which organ is abnormal?"], max_new_tokens=5)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_loss_on_answer_positions_equals_the_full_lm_loss(tiny_tokenizer):
    """The training forward computes logits only where a label is predicted; loss and gradients must not change."""
    from med3dvlm.train.vlm import VLMCollate

    model = Med3DVLM(med3dvlm.get_config("med3dvlm_test"), tokenizer=copy.deepcopy(tiny_tokenizer)).eval()
    items = [{"image": torch.rand(1, 64, 64, 64), "question": q, "answer": a}
             for q, a in [("Which plane is this image?", "axial"), ("What organ is abnormal? Choices: A. axial B. none", "B. none")]]
    batch = VLMCollate(model.processor)(items)
    fast = model(batch["input_ids"], batch["images"], batch["attention_mask"], batch["labels"]).loss
    fast.backward()
    fast_grad = model.projector.low[0].token_mlp.fc1.weight.grad.clone()
    model.zero_grad()
    embeds = model.embed_inputs(batch["input_ids"], batch["images"])
    full = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False).loss
    full.backward()
    assert torch.allclose(fast, full, atol=1e-5), (fast.item(), full.item())
    assert torch.allclose(fast_grad, model.projector.low[0].token_mlp.fc1.weight.grad, atol=1e-6)
