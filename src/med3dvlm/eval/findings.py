"""Finding-level scoring of generated reports against the phantom dataset's ground truth.

Text metrics (BLEU, ROUGE, ...) reward a fluent report that names the wrong plane. Here a report is read for
the findings a radiologist would check, and each is compared with what the phantom case really holds:

- the acquisition plane of the image the model saw, and the contrast phase;
- for the largest lesion: the organ it is in, its kind and the side of the body; a case without lesions has
  the single finding "no focal lesion" instead.

`finding_accuracy` is the share of true findings the report states correctly. `hallucination_rate` is the
share of the lesions a report states (kind + organ) that the case does not have. The reader knows the
phantom's vocabulary (`data.phantom_text`) only; it is not a general radiology parser.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.phantom import PHASES, PLANES

# Words that name each lesion kind in the phantom's report templates.
KIND_WORDS = {"cyst": ("cyst",), "mass": ("mass",), "calcification": ("calcification", "calcified"),
              "nodule": ("nodule",), "hemorrhage": ("hemorrhage",)}
ORGANS = ("right kidney", "left kidney", "right lung", "left lung", "liver", "spleen", "brain")
NO_LESION = "no focal lesion"


@dataclass
class ReadReport:
    """What a report states."""

    planes: set[str] = field(default_factory=set)
    phase: str | None = None
    lesions: list[dict[str, str | None]] = field(default_factory=list)  # {"kind", "organ", "side"}, in order
    no_lesion: bool = False


def read_report(text: str) -> ReadReport:
    """The planes, phase and lesions a phantom-style report states."""
    low = " ".join(str(text).lower().split())
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", low) if s.strip()]
    out = ReadReport()
    first = sentences[0] if sentences else ""
    out.planes = {p for p in PLANES if re.search(rf"\b{p}\b", first)}
    for phase in PHASES:
        if re.search(rf"\b{re.escape(phase)}\b", first):
            out.phase = phase
            break
    out.no_lesion = NO_LESION in low
    for sentence in sentences[1:]:
        kind = next((k for k, words in KIND_WORDS.items() if any(re.search(rf"\b{w}\b", sentence) for w in words)), None)
        if kind is None or "unremarkable" in sentence:
            continue
        where = sentence.split(" in the ", 1)[1] if " in the " in sentence else ""
        organ = next((o for o in ORGANS if o in where), None)
        if organ is None and any(w in where for w in ("frontal lobe", "occipital lobe")):
            organ = "brain"
        # The side of a brain lesion is written out ("left frontal lobe"); elsewhere it is the organ's side
        # ("left lobe of the liver" is still on the right of the body).
        side = next((s for s in ("left", "right") if re.search(rf"\b{s}\b", where)), None) if organ == "brain" else _organ_side(organ or "")
        out.lesions.append({"kind": kind, "organ": organ, "side": side})
    return out


def true_findings(case: Mapping[str, Any], plane: str) -> dict[str, str]:
    """The findings of `case` as seen on its series in `plane`: {name: value}."""
    found = {"plane": plane, "phase": case["phase"]}
    lesions = case["lesions"]
    if not lesions:
        found["lesion"] = NO_LESION
        return found
    top = lesions[0]  # the phantom sorts lesions by size, largest first
    found.update(organ=top["organ"], kind=top["kind"], side=top["side"])
    return found


def score_report(text: str, case: Mapping[str, Any], plane: str) -> dict[str, Any]:
    """Per-finding correctness of one report, and its stated lesions that the case does not have."""
    read = read_report(text)
    truth = true_findings(case, plane)
    correct: dict[str, bool] = {
        "plane": plane in read.planes and read.planes <= {s["plane"] for s in case["series"]},
        "phase": read.phase == truth["phase"],
    }
    if "lesion" in truth:
        correct["lesion"] = read.no_lesion and not read.lesions
    else:
        stated = [les for les in read.lesions if les["organ"] == truth["organ"]]
        correct["organ"] = bool(stated)
        correct["kind"] = any(les["kind"] == truth["kind"] for les in stated)
        correct["side"] = bool(stated) and stated[0]["side"] == truth["side"]
    present = {(les["kind"], les["organ"]) for les in case["lesions"]}
    false = [les for les in read.lesions if (les["kind"], les["organ"]) not in present]
    return {"correct": correct, "stated_lesions": len(read.lesions), "false_lesions": len(false)}


def _organ_side(organ: str) -> str | None:
    # Organs whose side is part of their name or fixed by anatomy, as the phantom places them.
    if organ.startswith(("left", "right")):
        return organ.split()[0]
    return {"liver": "right", "spleen": "left"}.get(organ)


def findings_summary(scores: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Finding accuracy and hallucination rate (both in %) over many scored reports, plus per finding."""
    per: dict[str, list[bool]] = {}
    for s in scores:
        for name, ok in s["correct"].items():
            per.setdefault(name, []).append(bool(ok))
    every = [ok for values in per.values() for ok in values]
    stated = sum(s["stated_lesions"] for s in scores)
    false = sum(s["false_lesions"] for s in scores)
    return {
        "n": len(scores),
        "findings": len(every),
        "finding_accuracy": round(100 * sum(every) / len(every), 2) if every else None,
        "by_finding": {k: round(100 * sum(v) / len(v), 2) for k, v in per.items()},
        "stated_lesions": stated,
        "hallucination_rate": round(100 * false / stated, 2) if stated else 0.0,
    }
