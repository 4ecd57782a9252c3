"""A fast greedy decoder for Llama-family Hugging Face causal LMs (Llama, SmolLM2, Qwen2), token for token
what `llm.generate(inputs_embeds=..., do_sample=False)` returns.

Why not `generate` itself: every step of Hugging Face's loop rebuilds masks and position ids, grows a dynamic
cache by concatenation, runs a list of logits processors and stopping criteria and dispatches through several
layers of generic modules. For a small model at batch 1 on a CPU that bookkeeping is a large part of a step.
Here the prompt runs once, then each step is the bare layer arithmetic over a key/value cache allocated once
for the whole call (a static cache: writes go into place, reads are views), with the per-row positions and
padding masks computed up front.

The layer arithmetic is the model's own: its norms, rotary tables and (LoRA-wrapped or not) projections are
called as they are, only the attention around the cache is ours, with `scaled_dot_product_attention`. Two
things make a step cheaper on a CPU: plain projections of a few rows run with the weight as the left operand
(`_linear`: the same product, summed in another order, so two logits within float rounding of each other could
in principle swap; the tests compare tokens with Hugging Face's), and rows that produced their eos leave the
batch. The decoding rules follow
Hugging Face's greedy search: finished rows are filled with `pad_token_id`, the call stops when every row has
produced an eos or after `max_new_tokens`, `min_new_tokens` masks the eos logits, and `repetition_penalty`
behaves exactly as its processor does with `inputs_embeds` (see `_RepetitionPenalty`).

`fast_greedy_plan` says whether a set of `generate` keyword arguments can take this path; anything it does not
know (sampling, beams, other processors, scores in the output) returns None and the caller keeps
Hugging Face's loop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .llm import base_llm

# Generation-config fields that greedy decoding ignores or that do not change its tokens (sampling knobs are
# only applied when sampling; beam-only options; output flags that only add tensors nobody asked for).
_IGNORED_FIELDS = frozenset({
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "early_stopping", "length_penalty", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "compile_config", "disable_compile", "output_attentions", "output_hidden_states", "max_length",
    "transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id", "low_memory",
})
# Fields this decoder implements itself.
_HANDLED_FIELDS = frozenset({"max_new_tokens", "min_new_tokens", "repetition_penalty", "eos_token_id", "pad_token_id"})
# Fields that may be set as long as they keep their no-op value.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "do_sample": (False,), "num_beams": (1,), "num_return_sequences": (1,), "min_length": (0,),
    "output_scores": (False,), "output_logits": (False,), "return_dict_in_generate": (False,),
    "remove_invalid_values": (False,), "renormalize_logits": (False,), "no_repeat_ngram_size": (0,),
    "encoder_repetition_penalty": (1.0,), "num_beam_groups": (1,), "diversity_penalty": (0.0,),
    "token_healing": (False,), "use_mtp": (False,), "is_assistant": (False,),
}
# Rotary variants whose tables depend only on the position (a "dynamic" one rescales with the sequence length).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


@dataclass(frozen=True)
class GreedyPlan:
    """What a greedy call asks for, resolved against the LLM's generation config as `generate` would."""

    max_new_tokens: int
    min_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    repetition_penalty: float | None
    streamer: Any = None


def fast_greedy_plan(llm: nn.Module, generate_kwargs: dict[str, Any]) -> GreedyPlan | None:
    """The plan for `llm.generate(inputs_embeds=..., **generate_kwargs)` if the fast decoder gives the same tokens,
    else None (sampling, beams, unknown processors or options, an architecture it does not know)."""
    if _decoder_parts(llm) is None:
        return None
    kwargs = dict(generate_kwargs)
    streamer = kwargs.pop("streamer", None)
    if kwargs.pop("generation_config", None) is not None:
        return None
    config = copy.deepcopy(base_llm(llm).generation_config)
    unused = config.update(**kwargs)
    if unused:  # logits_processor=, stopping_criteria=, assistant_model=, ...: not ours to reproduce
        return None
    for name, value in config.to_dict().items():
        if value is None or name in _IGNORED_FIELDS or name in _HANDLED_FIELDS:
            continue
        if name in _NO_OP_VALUES and value in _NO_OP_VALUES[name]:
            continue
        return None
    if config.max_new_tokens is None or config.max_new_tokens < 1:
        return None
    eos = config.eos_token_id
    eos_ids = tuple([eos] if isinstance(eos, int) else list(eos or []))
    pad = config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]  # as generate does
    penalty = config.repetition_penalty
    return GreedyPlan(
        max_new_tokens=int(config.max_new_tokens),
        min_new_tokens=int(config.min_new_tokens or 0),
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        repetition_penalty=None if penalty is None or penalty == 1.0 else float(penalty),
        streamer=streamer,
    )


@dataclass
class _Parts:
    layers: Sequence[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _decoder_parts(llm: nn.Module) -> _Parts | None:
    """The pieces of a Llama-style decoder, or None where the architecture differs in a way that matters."""
    base = base_llm(llm)
    inner = getattr(base, "model", None)
    config = getattr(base, "config", None)
    if inner is None or config is None or getattr(config, "is_encoder_decoder", False):
        return None
    layers = getattr(inner, "layers", None)
    norm, rotary, lm_head = getattr(inner, "norm", None), getattr(inner, "rotary_emb", None), getattr(base, "lm_head", None)
    if layers is None or norm is None or rotary is None or lm_head is None or len(layers) == 0:
        return None
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE_TYPES:
        return None
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return None  # sliding-window layers
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return None
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return None
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm") or getattr(attn, "sliding_window", None):
            return None
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            return None
        if type(layer).__name__ not in ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"):
            return None  # other families reorder norms or scale embeddings; not checked here
    first = layers[0].self_attn
    heads = config.num_attention_heads
    return _Parts(layers=layers, norm=norm, lm_head=lm_head, rotary=rotary, num_heads=heads,
                  num_kv_heads=config.num_key_value_heads, head_dim=first.head_dim)


# Up to this many rows, a CPU projection runs as (W @ x^T)^T instead of x @ W^T (see `_linear`); measured faster
# at every size up to 64 on the development machine (docs/benchmarks.md).
_FEW_ROWS = 64


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, for a plain `nn.Linear` on a CPU and a few rows computed with the weight as the left operand.

    Decoding multiplies a handful of rows by every weight matrix, so a step is bound by how fast the weights are
    read. For such shapes the CPU kernel behind `F.linear` reads them at 7-12 GB/s, while the same product with
    the weight on the left streams it at ~30 GB/s on the development machine (benchmarks/generate.py). A single
    row gets a second, zero row: the matrix-vector kernel is as slow as `F.linear`. Other modules (a LoRA-wrapped
    projection) and other devices are called as they are.
    """
    if type(module) is not nn.Linear or x.device.type != "cpu":
        return module(x)
    rows = x.numel() // x.shape[-1]
    if rows > _FEW_ROWS:
        return module(x)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = torch.cat([flat, torch.zeros_like(flat)])
    y = (module.weight @ flat.t()).t()[:rows]
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], module.out_features)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP of Llama and Qwen2 (`down(act(gate(x)) * up(x))`, their `forward`), through `_linear`."""
    return _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _RepetitionPenalty:
    """Hugging Face's repetition penalty as `generate(inputs_embeds=..., attention_mask=...)` applies it.

    With `inputs_embeds` the penalised ids are only the generated ones, and the processor skips the first
    `padding_length` of them in each row (it was written for prompts in `input_ids`, where those positions are
    the padding). Reproduced as is, so this path gives the same tokens as the one it replaces.
    """

    def __init__(self, penalty: float, attention_mask: torch.Tensor, vocab_size: int) -> None:
        self.penalty = penalty
        self.skip = (attention_mask != 0).int().argmax(dim=1)  # left padding per row
        self.seen = torch.zeros(attention_mask.shape[0], vocab_size, dtype=torch.bool, device=attention_mask.device)
        self.rows = torch.arange(attention_mask.shape[0], device=attention_mask.device)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(self.seen, penalised, scores)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the rows not in `rows` (a boolean mask over the current rows): they finished."""
        self.skip, self.seen = self.skip[rows], self.seen[rows]
        self.rows = torch.arange(self.seen.shape[0], device=self.seen.device)

    def record(self, step: int, tokens: torch.Tensor) -> None:
        # Rows still inside their skipped stretch keep their mask (the value written is what it already held).
        # Ids past the logits (a pad id outside the LM head) are never penalised, as in the processor.
        vocab = self.seen.shape[1]
        counted = (step >= self.skip) & (tokens < vocab)
        tokens = tokens.clamp(max=vocab - 1)
        self.seen[self.rows, tokens] = self.seen[self.rows, tokens] | counted


@torch.no_grad()
def greedy_generate(
    llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, plan: GreedyPlan,
) -> torch.Tensor:
    """(B, new) token ids, as `llm.generate(inputs_embeds=..., attention_mask=..., do_sample=False, ...)` returns.

    Prompts are left-padded (the last column is real in every row); `attention_mask` is 1 on real positions.
    """
    parts = _decoder_parts(llm)
    if parts is None:
        raise ValueError(f"{type(base_llm(llm)).__name__} is not a decoder the fast path knows; use llm.generate")
    batch, prompt_len, _ = inputs_embeds.shape
    device, dtype = inputs_embeds.device, inputs_embeds.dtype
    if attention_mask is None:
        attention_mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    padded = not bool(mask.all())
    total = prompt_len + plan.max_new_tokens

    # Positions as generate derives them: the count of real tokens before each one (padding sits at 0), and one
    # more per generated token. The rotary tables for every position of the call are computed once.
    prompt_pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
    new_pos = prompt_pos[:, -1:] + torch.arange(1, plan.max_new_tokens + 1, device=device)
    cos, sin = parts.rotary(inputs_embeds, torch.cat([prompt_pos, new_pos], dim=1))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, total, head_dim): broadcast over heads

    # The whole call's key/value cache, per layer (B, kv_heads, total, head_dim), written in place.
    shape = (batch, parts.num_kv_heads, total, parts.head_dim)
    cache = [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
             for _ in parts.layers]
    groups = parts.num_heads // parts.num_kv_heads

    # Keys a query may see: earlier real positions. A padded query also sees itself, so no softmax row is
    # empty (an all-masked row gives NaN, which would leak into later layers through the cached values).
    if padded:
        keys_ok = torch.cat([mask, torch.ones(batch, plan.max_new_tokens, dtype=torch.bool, device=device)], dim=1)
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
        prefill_mask = (causal & keys_ok[:, None, None, :prompt_len]) | eye
    else:
        keys_ok, prefill_mask = None, None

    def attend(layer_idx: int, attn: nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
        b, n, _ = x.shape
        q = _linear(attn.q_proj, x).view(b, n, parts.num_heads, parts.head_dim).transpose(1, 2)
        k = _linear(attn.k_proj, x).view(b, n, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        v = _linear(attn.v_proj, x).view(b, n, parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        c, s = cos[:, :, start:start + n], sin[:, :, start:start + n]
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        k_cache, v_cache = cache[layer_idx]
        k_cache[:, :, start:start + n] = k
        v_cache[:, :, start:start + n] = v
        keys, values = k_cache[:, :, :start + n], v_cache[:, :, :start + n]
        if n > 1:  # the prompt
            if prefill_mask is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.scaling, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=prefill_mask, scale=attn.scaling,
                                                     enable_gqa=True)
        else:
            # One query: fold the query heads of each key/value head into the query axis, so the grouped keys are
            # read once and no head is repeated in memory.
            qg = q.reshape(b, parts.num_kv_heads, groups, parts.head_dim)
            step_mask = None if keys_ok is None else keys_ok[:, None, None, :start + 1]
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=step_mask, scale=attn.scaling)
            out = out.reshape(b, parts.num_heads, 1, parts.head_dim)
        return _linear(attn.o_proj, out.transpose(1, 2).reshape(b, n, -1))

    def forward(x: torch.Tensor, start: int) -> torch.Tensor:
        for i, layer in enumerate(parts.layers):
            x = x + attend(i, layer.self_attn, layer.input_layernorm(x), start)
            x = x + _mlp(layer.mlp, layer.post_attention_layernorm(x))
        # Only the last position's logits are ever needed.
        return _linear(parts.lm_head, parts.norm(x[:, -1:]))[:, -1].float()

    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=device) if plan.eos_token_ids else None
    pad = plan.pad_token_id
    if eos is not None and pad is None:
        raise ValueError("an eos token needs a pad token to fill finished rows")
    streamer = plan.streamer
    if streamer is not None:
        streamer.put(torch.empty(batch, 0, dtype=torch.long))  # generate hands the (empty) prompt ids over first
    # Rows that produced an eos leave the batch: every later step (and every cache read) is over the rows still
    # decoding only, so a short answer batched with a long report stops costing anything once it is done.
    # `active` maps the rows being computed to the call's rows.
    active = torch.arange(batch, device=device)
    out = torch.full((batch, plan.max_new_tokens), -1 if pad is None else pad, dtype=torch.long, device=device)
    logits = forward(inputs_embeds, 0)
    penalty = None if plan.repetition_penalty is None else \
        _RepetitionPenalty(plan.repetition_penalty, attention_mask, logits.shape[-1])
    embed = llm.get_input_embeddings()
    steps = 0
    for step in range(plan.max_new_tokens):
        if penalty is not None:
            logits = penalty(logits)
        if eos is not None and step < plan.min_new_tokens:
            logits[:, eos] = -float("inf")
        token = logits.argmax(dim=-1)
        out[active, step] = token
        steps = step + 1
        if streamer is not None:
            streamer.put(out[:, step].cpu())
        done = torch.isin(token, eos) if eos is not None else None
        if done is not None and bool(done.all()):
            break
        if step + 1 == plan.max_new_tokens:
            break
        if penalty is not None:
            penalty.record(step, token)
        if done is not None and bool(done.any()):
            keep = ~done
            active, token = active[keep], token[keep]
            cache[:] = [(k[keep], v[keep]) for k, v in cache]
            cos, sin = cos[keep], sin[keep]
            if keys_ok is not None:
                keys_ok = keys_ok[keep]
            if penalty is not None:
                penalty.keep(keep)
        logits = forward(embed(token[:, None]), prompt_len + step)
    if streamer is not None:
        streamer.end()
    return out[:, :steps]

