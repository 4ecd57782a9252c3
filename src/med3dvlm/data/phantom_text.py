"""Reports and VQA rows of the phantom dataset, derived only from each case's ground truth.

Reports are templated sentences (region, plane, phase, then one sentence per lesion with kind, size
and location, then the normal organs). VQA rows follow M3D-VQA: 9 closed questions per image, Q1-3 of
types 1-3 (Plane, Phase, Organ), Q4-6 type 4 (Abnormality), Q7-9 type 5 (Location); yes/no rows have
the same columns with choices Yes/No.
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
SIZE_BINS = ("Less than 1 cm", "1 to 3 cm", "3 to 5 cm", "More than 5 cm")
TEMPLATES = {
    "cyst": ("{A} {d} well-defined hypodense cyst is seen in the {loc}.", "There is a simple cyst measuring {d} in the {loc}."),
    "mass": ("There is {a} {d} {enh} mass in the {loc}.", "A {enh} mass measuring {d} is present in the {loc}."),
    "calcification": ("{A} {d} calcification is noted in the {loc}.", "There is {a} {d} calcified focus in the {loc}."),
    "nodule": ("{A} {d} solid nodule is seen in the {loc}.", "There is {a} {d} pulmonary nodule in the {loc}."),
    "hemorrhage": ("There is an acute {d} hyperdense hemorrhage in the {loc}.", "{A} {d} intraparenchymal hemorrhage is seen in the {loc}."),
}


def _size(mm: float) -> str:
    return f"{mm:.0f} mm" if mm < 10 else f"{mm / 10:.1f} cm"


def size_bin(mm: float) -> str:
    return SIZE_BINS[int(np.searchsorted([10, 30, 50], mm, side="right"))]


def _phase_words(phase: str) -> str:
    return "non-contrast" if phase == "non-contrast" else f"{phase} phase"


def report_text(case: dict[str, Any]) -> str:
    """The case's report: first sentence region/plane/phase, then findings, then normal organs."""
    rng = np.random.default_rng([case["seed"], case["index"], 3])
    planes = " and ".join(s["plane"] for s in case["series"])
    sentences = [f"{planes.capitalize()} {_phase_words(case['phase'])} CT of the {case['region']}.", PHASE_SENTENCE[case["phase"]]]
    for lesion in case["lesions"]:
        enh = "soft-tissue" if lesion["tissue"] == "lung" else ("hypoattenuating" if case["phase"] == "non-contrast" else "hypoenhancing")
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


def _side_answer(organ: dict[str, Any]) -> str:
    return "Midline" if organ["side"] == "midline" else f"{organ['side'].capitalize()} side"


def vqa_rows(case: dict[str, Any], series: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The 9 M3D-VQA rows of one image: types 1, 2, 3, then 4, 4, 4, then 5, 5, 5."""
    image, text = series["image"], case["report"]
    lesions, organs = case["lesions"], case["organs"]
    q = lambda *a: _closed(rng, *a, image, text)  # noqa: E731 - a local shorthand
    plane = series["plane"].capitalize()
    rows = [
        q(1, "In which plane is this CT image acquired?", plane, ["Axial", "Coronal", "Sagittal", "Oblique"]),
        q(2, "Which contrast phase is this CT image?", PHASE_LABEL[case["phase"]], list(PHASE_LABEL.values())),
    ]
    other_organs = [o.capitalize() for o in ALL_ORGANS]
    kinds = list(KIND_LABEL.values())
    n = len(lesions)
    if lesions:
        top = lesions[0]
        kind = top["kind"]
        rows.append(q(3, "Which organ shows an abnormality in this image?", top["organ"].capitalize(), other_organs))
        rows.append(q(4, f"What type of abnormality is seen in the {top['organ']}?", KIND_LABEL[kind], kinds))
        rows.append(q(4, "How many focal lesions are seen in this image?", str(n), ["0", "1", "2", "3", "4"]))
        rows.append(q(4, "What is the approximate size of the largest lesion?", size_bin(top["diameter_mm"]), list(SIZE_BINS)))
        same_region = [f"{p} of the {o['name']}" if o["name"] != "brain" else f"{s} {p}" for o in organs for p in o["parts"] for s in ("left", "right")]
        rows.append(q(5, f"Where is the {kind} located?", top["location"].capitalize(), [loc.capitalize() for loc in same_region]))
        rows.append(q(5, f"On which side of the body is the largest {kind}?", top["side"].capitalize(), ["Left", "Right", "Midline"]))
        part = "Upper part" if top["upper"] else "Lower part"
        rows.append(q(5, f"Is the {kind} in the upper or lower part of the {top['organ']}?", part, ["Upper part", "Lower part"]))
    else:
        shown = organs[int(rng.integers(len(organs)))]
        absent = [o.capitalize() for o in ALL_ORGANS if o not in {x["name"] for x in organs}]
        rows.append(q(3, "Which organ is visible in this image?", shown["name"].capitalize(), absent))
        rows.append(q(4, "What abnormality is seen in this image?", "No abnormality", kinds))
        rows.append(q(4, "How many focal lesions are seen in this image?", "0", ["1", "2", "3", "4"]))
        rows.append(q(4, "What is the approximate size of the largest lesion?", "No lesion", list(SIZE_BINS)))
        rows.append(q(5, f"Where is the {shown['name']} located?", _side_answer(shown), ["Left side", "Right side", "Midline"]))
        other = organs[int(rng.integers(len(organs)))]
        rows.append(q(5, f"On which side of the body is the {other['name']}?", _side_answer(other), ["Left side", "Right side", "Midline"]))
        rows.append(q(5, "Which part of the body was scanned?", case["region"].capitalize(), ["Head", "Chest", "Abdomen", "Pelvis"]))
    return rows


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
