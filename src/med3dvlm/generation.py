"""How text is generated: one set of decoding settings for prediction, serving and evaluation.

Greedy decoding is the default, so a result can be reproduced exactly without a seed. The original
Med3DVLM evaluation sampled at temperature 1.0; `GenerationSettings.paper()` gives that. Callers that
need a seed where none is given (evaluation picks one caption prompt per item with it) say so
themselves; the class does not guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(kw_only=True)
class GenerationSettings:
    """Decoding settings. Keyword-only, so adding a field never shifts the meaning of a call."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None  # None: whatever the LLM's generation_config says
    seed: int | None = None  # seeds torch before generating (matters only when sampling); None: not reseeded
    batch_size: int = 4  # prompts per generate call when a whole dataset is answered

    @classmethod
    def paper(cls, **overrides: Any) -> GenerationSettings:
        """`generate(max_new_tokens=256, do_sample=True, top_p=None, temperature=1.0)` as the eval scripts ran it."""
        return cls(**{"do_sample": True, "temperature": 1.0, "top_p": None, **overrides})

    def to_dict(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """All fields, or only `keys` (in that order)."""
        data = dataclasses.asdict(self)
        return data if keys is None else {k: data[k] for k in keys}

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Hugging Face `generate`: sampling knobs only when sampling, and only those set."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": 1}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            # top_p=None in the original leaves the model's default; stated explicitly only when given
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs
