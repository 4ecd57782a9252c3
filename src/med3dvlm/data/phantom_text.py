"""Reports and VQA rows of the phantom dataset, derived only from each case's ground truth.

Reports are templated sentences (region, plane, phase, then one sentence per lesion with kind, size
and location, then the normal organs). VQA rows follow M3D-VQA's columns and its five question types, one
closed question of each type per image; yes/no rows have the same columns with choices Yes/No.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .m3d import CHOICE_LETTERS, NA

PHASE_LABEL = {"non-contrast": "Non-contrast", "arterial": "Arterial", "portal venous": "Portal venous", "delayed": "Delayed"}
PHASE_SENTENCE = {
    "non-contrast": "No intravenous contrast was given.",
    "arterial": "The arteries are densely opacified by contrast.",
    "portal venous": "Contrast fills the portal and systemic veins.",
    "delayed": "Images were acquired in a delayed phase after contrast.",
}
KIND_LABEL = {"cyst": "Cyst", "mass": "Mass", "calcification": "Calcification", "nodule": "Nodule", "hemorrhage": "Hemorrhage"}
ALL_ORGANS = ("liver", "spleen", "right kidney", "left kidney", "right lung", "left lung", "brain", "pancreas", "heart", "bladder")
NO_ORGAN = "No abnormal organ"  # not "None", which pandas and others read as missing
NO_ABNORMALITY = "No abnormality"
TEMPLATES = {
    "cyst": ("{A} {d} well-defined hypodense cyst is seen in the {loc}.", "There is a simple cyst measuring {d} in the {loc}."),
    "mass": ("There is {a} {d} {enh} mass in the {loc}.", "A {enh} mass measuring {d} is present in the {loc}."),
    "calcification": ("{A} {d} calcification is noted in the {loc}.", "There is {a} {d} calcified focus in the {loc}."),
    "nodule": ("{A} {d} solid nodule is seen in the {loc}.", "There is {a} {d} pulmonary nodule in the {loc}."),
    "hemorrhage": ("There is an acute {d} hyperdense hemorrhage in the {loc}.", "{A} {d} intraparenchymal hemorrhage is seen in the {loc}."),
}


def _size(mm: float) -> str:
    return f"{mm:.0f} mm" if mm < 10 else f"{mm / 10:.1f} cm"


def _phase_words(phase: str) -> str:
    return "non-contrast" if phase == "non-contrast" else f"{phase} phase"


def _mass_density(tissue: str, phase: str) -> str:
    """How a mass looks against its organ, as `phantom._lesion_hu` renders it."""
    if tissue == "lung":
        return "soft-tissue"
    prefix = "hypo" if tissue == "brain" else "hyper"
    return prefix + ("attenuating" if phase == "non-contrast" else "enhancing")


def report_text(case: dict[str, Any]) -> str:
    """The case's report: first sentence region/plane/phase, then findings, then normal organs."""
    rng = np.random.default_rng([case["seed"], case["index"], 3])
    planes = " and ".join(s["plane"] for s in case["series"])
    sentences = [f"{planes.capitalize()} {_phase_words(case['phase'])} CT of the {case['region']}.", PHASE_SENTENCE[case["phase"]]]
    for lesion in case["lesions"]:
        enh = _mass_density(lesion["tissue"], case["phase"])
        template = TEMPLATES[lesion["kind"]][int(rng.integers(2))]
        size = _size(lesion["diameter_mm"])
        article = "an" if size.startswith("8") else "a"  # "an 8 mm", "an 8.2 cm"; sizes >= 10 mm are in cm
        sentences.append(template.format(d=size, loc=lesion["location"], enh=enh, a=article, A=article.capitalize()))
    if not case["lesions"]:
        sentences.append("No focal lesion is identified.")
    involved = {lesion["organ"] for lesion in case["lesions"]}
    normal = [o["name"] for o in case["organs"] if o["name"] not in involved]
    if normal:
        verb = "is" if len(normal) == 1 else "are"
        listed = normal[0] if len(normal) == 1 else ", ".join(normal[:-1]) + " and " + normal[-1]
        sentences.append(f"The {listed} {verb} unremarkable.")
    return " ".join(sentences)


def _closed(
    rng: np.random.Generator, qtype: int, question: str, answer: str, distractors: list[str], image: str, text: str
) -> dict[str, Any]:
    """One M3D-VQA row: the answer among up to 3 distractors in shuffled order, 'NA' for missing choices."""
    pool = [d for d in dict.fromkeys(distractors) if d != answer]
    picked = [pool[i] for i in rng.permutation(len(pool))[:3]] if pool else []
    choices = [answer, *picked]
    choices = [choices[i] for i in rng.permutation(len(choices))]
    row = {"Image Path": image, "Text": text, "Question Type": qtype, "Question": question}
    for letter, choice in zip(CHOICE_LETTERS, choices + [NA] * (4 - len(choices))):
        row[f"Choice {letter}"] = choice
    row["Answer"] = answer
    row["Answer Choice"] = CHOICE_LETTERS[choices.index(answer)]
    return row


def vqa_rows(case: dict[str, Any], series: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The 5 M3D-VQA rows of one image, one per question type: Plane, Phase, Organ, Abnormality, Location.

    Every question is worded the same whatever the case holds, so the question alone never tells the answer:
    a case without lesions answers the lesion questions "None" / "No abnormality" instead of being asked
    something else. Organ, Abnormality and Location ask about the largest lesion.
    """
    image, text = series["image"], case["report"]
    top = case["lesions"][0] if case["lesions"] else None
    q = lambda *a: _closed(rng, *a, image, text)  # noqa: E731 - a local shorthand
    organs = [o.capitalize() for o in ALL_ORGANS] + [NO_ORGAN]
    kinds = [*KIND_LABEL.values(), NO_ABNORMALITY]
    return [
        q(1, "In which plane is this CT image acquired?", series["plane"].capitalize(), ["Axial", "Coronal", "Sagittal", "Oblique"]),
        q(2, "Which contrast phase is this CT image?", PHASE_LABEL[case["phase"]], list(PHASE_LABEL.values())),
        q(3, "Which organ shows an abnormality in this image?", top["organ"].capitalize() if top else NO_ORGAN, organs),
        q(4, "What type of abnormality is seen in this image?", KIND_LABEL[top["kind"]] if top else NO_ABNORMALITY, kinds),
        q(5, "On which side of the body is the largest abnormality?", top["side"].capitalize() if top else NO_ABNORMALITY,
          ["Left", "Right", "Midline", NO_ABNORMALITY]),
    ]


def _yn(qtype: int, question: str, yes: bool, image: str, text: str) -> dict[str, Any]:
    return {
        "Image Path": image,
        "Text": text,
        "Question Type": qtype,
        "Question": question,
        "Choice A": "Yes",
        "Choice B": "No",
        "Choice C": NA,
        "Choice D": NA,
        "Answer": "Yes" if yes else "No",
        "Answer Choice": "A" if yes else "B",
    }


def yes_no_rows(case: dict[str, Any], series: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Five yes/no rows (one per question type), balanced between true and false statements."""
    image, text = series["image"], case["report"]
    lesions = case["lesions"]
    plane_q = series["plane"] if rng.random() < 0.5 else str(rng.choice([p for p in ("axial", "coronal", "sagittal") if p != series["plane"]]))
    present = [o["name"] for o in case["organs"]]
    organ_q = str(rng.choice(present)) if rng.random() < 0.5 else str(rng.choice([o for o in ALL_ORGANS if o not in present]))
    kinds_present = {les["kind"] for les in lesions}
    if kinds_present and rng.random() < 0.5:
        kind_q = str(rng.choice(sorted(kinds_present)))
    else:
        kind_q = str(rng.choice([k for k in KIND_LABEL if k not in kinds_present]))
    side_q = str(rng.choice(["left", "right"]))
    article = "an" if plane_q[0] in "aeiou" else "a"
    return [
        _yn(1, f"Is this {article} {plane_q} image?", plane_q == series["plane"], image, text),
        _yn(2, "Was intravenous contrast given for this scan?", case["phase"] != "non-contrast", image, text),
        _yn(3, f"Is the {organ_q} visible in this image?", organ_q in present, image, text),
        _yn(4, f"Is there a {kind_q} in this image?", kind_q in kinds_present, image, text),
        _yn(5, f"Is there an abnormality on the {side_q} side of the body?", any(les["side"] == side_q for les in lesions), image, text),
    ]
