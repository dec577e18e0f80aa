"""The course's generated text task: review sentiment that needs composition to read.

Each example is a short product or place review. Its label is one of four classes,

    0 strongly negative   1 negative   2 positive   3 strongly positive

and is decided by rules that a bag of words cannot follow:

- polarity and strength of the adjective: "good" (mild +), "superb" (strong +),
  "poor" (mild -), "awful" (strong -);
- intensity: an intensifier makes a clause strong ("extremely good"), a downtoner mild
  ("somewhat awful");
- negation flips polarity and leaves a mild judgement ("not good" = negative,
  "never terrible" = positive): the same words give the opposite label;
- contrast: with "X, but Y", "X. However, Y" and "Although X, Y" the clause Y decides;
  with "Y, although X" and "Y, even though X" the clause Y still decides, but now comes first.
  Both clauses carry opposite sentiment words, so word counts alone cannot tell the label.

A frozen sentence encoder averages its token vectors (mean pooling) and so sees nearly the
same features for "A was great, but B was awful" and "A was awful, but B was great"; a linear
probe on those features stays far below a fine-tuned encoder, which learns to read the
structure (the figures are measured in notebooks/part1_foundations/02_peft_zoo.ipynb).

The entities being reviewed ("this laptop", "the hotel") are split between train, validation
and test, so evaluation sentences are about things never seen in training. Everything is
deterministic given the seed.

Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from course_lib import config
from course_lib.text.data import TextSplit

__all__ = ["LABEL_NAMES", "TextTask", "make_sentiment_task", "label_of_clause"]

LABEL_NAMES: tuple[str, ...] = ("strongly negative", "negative", "positive", "strongly positive")

# adjectives by (polarity, strength)
_ADJECTIVES: dict[tuple[int, str], tuple[str, ...]] = {
    (+1, "strong"): ("superb", "outstanding", "excellent", "fantastic", "wonderful", "amazing", "brilliant", "stunning"),
    (+1, "mild"): ("good", "nice", "decent", "fine", "pleasant", "solid", "okay", "reasonable"),
    (-1, "mild"): ("bad", "poor", "weak", "mediocre", "disappointing", "lacking", "subpar", "unimpressive"),
    (-1, "strong"): ("awful", "terrible", "horrible", "dreadful", "atrocious", "abysmal", "appalling", "horrendous"),
}
_INTENSIFIERS = ("extremely", "really", "incredibly", "truly", "exceptionally", "remarkably")
_DOWNTONERS = ("somewhat", "fairly", "rather", "a bit", "kind of", "moderately")
_NEGATIONS = ("not", "never", "hardly", "not at all")  # "not at all" wraps the adjective: "not good at all"

# domain -> (entities, aspects); entities are split between train / validation / test
_DOMAINS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "restaurant": (
        ("this restaurant", "the bistro", "that diner", "the cafe", "this pizzeria", "the steakhouse", "that noodle bar", "the brasserie"),
        ("food", "service", "menu", "dessert", "atmosphere", "wine list", "price", "portion size"),
    ),
    "hotel": (
        ("this hotel", "the resort", "that hostel", "the guesthouse", "this motel", "the inn", "that lodge", "the spa hotel"),
        ("room", "breakfast", "location", "pool", "reception", "view", "wifi", "bed"),
    ),
    "phone": (
        ("this phone", "the tablet", "that smartwatch", "the handset", "this e-reader", "the smartphone", "that phablet", "the pager"),
        ("battery", "screen", "camera", "speaker", "charger", "keyboard", "design", "software"),
    ),
    "laptop": (
        ("this laptop", "the notebook", "that desktop", "the workstation", "this chromebook", "the ultrabook", "that netbook", "the mini pc"),
        ("display", "trackpad", "fan", "build quality", "webcam", "performance", "hinge", "price"),
    ),
    "film": (
        ("this film", "the movie", "that documentary", "the sequel", "this thriller", "the comedy", "that drama", "the cartoon"),
        ("plot", "acting", "soundtrack", "ending", "script", "pacing", "dialogue", "cinematography"),
    ),
    "book": (
        ("this book", "the novel", "that memoir", "the biography", "this cookbook", "the textbook", "that anthology", "the guidebook"),
        ("writing", "story", "cover", "translation", "introduction", "final chapter", "style", "index"),
    ),
    "car": (
        ("this car", "the van", "that truck", "the hatchback", "this scooter", "the motorbike", "that sedan", "the camper"),
        ("engine", "steering", "interior", "fuel economy", "gearbox", "boot space", "ride", "stereo"),
    ),
    "headphones": (
        ("these headphones", "the earbuds", "that headset", "the speakers", "this soundbar", "the amplifier", "that turntable", "the radio"),
        ("sound", "bass", "fit", "noise cancelling", "microphone", "battery life", "volume", "case"),
    ),
}

_ENTITY_SPLITS = {"train": slice(0, 5), "validation": slice(5, 6), "test": slice(6, 8)}


@dataclass(frozen=True)
class TextTask:
    """A text classification task: its name, label names and three disjoint splits."""

    name: str
    label_names: tuple[str, ...]
    train: TextSplit
    validation: TextSplit
    test: TextSplit

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def label_of_clause(polarity: int, strength: str) -> int:
    """Class index of a clause judgement: (-1, strong)->0, (-1, mild)->1, (+1, mild)->2, (+1, strong)->3."""
    if polarity not in (-1, 1) or strength not in ("mild", "strong"):
        raise ValueError(f"polarity must be +1/-1 and strength 'mild'/'strong', got {polarity!r}, {strength!r}")
    return {(-1, "strong"): 0, (-1, "mild"): 1, (1, "mild"): 2, (1, "strong"): 3}[(polarity, strength)]


def _predicate(rng: random.Random, polarity: int, strength: str) -> tuple[str, bool]:
    """Words after "was" that express (polarity, strength); returns (words, negated)."""
    choices = ["plain"] * 3 + ["modifier"] * 2
    if strength == "mild":
        choices += ["negation"] * 4  # mild judgements are often said by negating the opposite
    how = rng.choice(choices)
    if how == "negation":
        # negation flips polarity and weakens: "not good" (mild -), "never terrible" (mild +)
        adjective = rng.choice(_ADJECTIVES[(-polarity, rng.choice(("mild", "strong")))])
        negation = rng.choice(_NEGATIONS)
        return (f"not {adjective} at all" if negation == "not at all" else f"{negation} {adjective}"), True
    if how == "modifier":
        if strength == "strong":  # intensifier + any adjective of that polarity -> strong
            adjective = rng.choice(_ADJECTIVES[(polarity, rng.choice(("mild", "strong")))])
            return f"{rng.choice(_INTENSIFIERS)} {adjective}", False
        adjective = rng.choice(_ADJECTIVES[(polarity, rng.choice(("mild", "strong")))])  # downtoner -> mild
        return f"{rng.choice(_DOWNTONERS)} {adjective}", False
    return rng.choice(_ADJECTIVES[(polarity, strength)]), False


def _clause(
    rng: random.Random, entity: str, aspect: str, polarity: int, strength: str, *, with_entity: bool, opener: bool
) -> tuple[str, bool]:
    predicate, negated = _predicate(rng, polarity, strength)
    verb = rng.choice(("was", "is"))
    if not with_entity:
        subject = f"the {aspect}"
    else:
        possessive = f"{entity}'" if entity.endswith("s") else f"{entity}'s"  # "these headphones' sound"
        subject = rng.choice((f"the {aspect} of {entity}", f"the {aspect} of {entity}", f"{possessive} {aspect}"))
    start = rng.choice(("", "", "", "honestly, ", "I think ", "I found that ", "overall, ")) if opener else ""
    return f"{start}{subject} {verb} {predicate}", negated


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _example(rng: random.Random, label: int, entities: tuple[str, ...], domain: str) -> tuple[str, str]:
    """One review with the given label; returns (text, kind)."""
    _, aspects = _DOMAINS[domain]
    polarity, strength = [(-1, "strong"), (-1, "mild"), (1, "mild"), (1, "strong")][label]
    entity = rng.choice(entities)
    deciding_aspect, other_aspect = rng.sample(aspects, 2)
    construction = rng.choice(("plain", "plain", "but", "however", "although_first", "although_last", "even_though"))
    if construction == "plain":
        clause, negated = _clause(rng, entity, deciding_aspect, polarity, strength, with_entity=True, opener=True)
        return _capitalise(clause) + ".", "negation" if negated else "plain"
    # the overridden clause has the opposite polarity, any strength, and may be negated itself
    other_strength = rng.choice(("mild", "strong"))
    if construction in ("although_last", "even_though"):  # the deciding clause comes first
        deciding, negated = _clause(rng, entity, deciding_aspect, polarity, strength, with_entity=True, opener=True)
        other, _ = _clause(rng, entity, other_aspect, -polarity, other_strength, with_entity=False, opener=False)
        joint = "although" if construction == "although_last" else "even though"
        text = f"{_capitalise(deciding)}, {joint} {other}."
    else:  # the deciding clause comes last
        first_opener = construction != "although_first"
        other, _ = _clause(rng, entity, other_aspect, -polarity, other_strength, with_entity=True, opener=first_opener)
        deciding, negated = _clause(rng, entity, deciding_aspect, polarity, strength, with_entity=False, opener=False)
        if construction == "but":
            text = f"{_capitalise(other)}, but {deciding}."
        elif construction == "however":
            text = f"{_capitalise(other)}. However, {deciding}."
        else:
            text = f"Although {other}, {deciding}."
    return text, "contrast+negation" if negated else "contrast"


def _make_split(rng: random.Random, size: int, split: str) -> TextSplit:
    texts, labels, kinds = [], [], []
    seen: set[str] = set()
    domains = sorted(_DOMAINS)
    attempts = 0
    while len(texts) < size:
        attempts += 1
        if attempts > 50 * size + 1000:
            raise RuntimeError(f"could not generate {size} distinct examples for {split}")
        label = len(texts) % len(LABEL_NAMES)  # balanced classes, shuffled below
        domain = rng.choice(domains)
        entities = _DOMAINS[domain][0][_ENTITY_SPLITS[split]]
        text, kind = _example(rng, label, entities, domain)
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(label)
        kinds.append(kind)
    order = list(range(size))
    rng.shuffle(order)
    return TextSplit([texts[i] for i in order], [labels[i] for i in order], LABEL_NAMES, kinds=[kinds[i] for i in order])


def make_sentiment_task(
    num_train: int | None = None,
    num_validation: int | None = None,
    num_test: int | None = None,
    *,
    seed: int = config.SEED,
) -> TextTask:
    """The generated 4-class review sentiment task (see the module docstring for its rules).

    Default sizes: 2000 / 500 / 500, or 256 / 128 / 128 under COURSE_FAST=1. The three splits
    are about disjoint sets of entities and each is balanced over the four classes.

    Derived in notebooks/part1_foundations/02_peft_zoo.ipynb.
    """
    sizes = {
        "train": num_train if num_train is not None else config.fast_or_full(256, 2000),
        "validation": num_validation if num_validation is not None else config.fast_or_full(128, 500),
        "test": num_test if num_test is not None else config.fast_or_full(128, 500),
    }
    for split, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"num_{split} must be a positive int, got {size!r}")
    # one independent RNG per split, so changing one size does not change the other splits
    splits = {split: _make_split(random.Random(f"{seed}-{split}"), size, split) for split, size in sizes.items()}
    return TextTask("review sentiment", LABEL_NAMES, splits["train"], splits["validation"], splits["test"])
