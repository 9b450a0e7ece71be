"""COCO categories that an image's human captions name: object facts for photos without boxes.

coco2017-val has captions for all 2,278 photos but instances for 94, so questions grounded in boxes cover
too few photos to learn object presence from (the photos-recipe chain learned the answer prior: docs/experiments/photo-chains.md).
Captions are a second, weaker source: a category counts as present when at least `min_captions` of the
image's captions name it through a word of its synonym list, the way CHAIR (Rohrbach et al., EMNLP 2018)
maps caption words to COCO categories. Presence from two independent annotators is reliable; absence is
not (captions skip small background objects), so these facts feed training questions only, never scores.

The synonym lists are written here, small and conservative: a word that often means something else in a
caption ("orange" the colour, "glove" on a skier, "pitcher" of water, "bat" the animal) is left out or
kept only in a form that is unambiguous ("oranges", "baseball glove").
"""

from __future__ import annotations

import re

SYNONYMS: dict[str, list[str]] = {
    "person": [
        "person",
        "people",
        "man",
        "men",
        "woman",
        "women",
        "boy",
        "girl",
        "child",
        "children",
        "kid",
        "guy",
        "lady",
        "ladies",
        "player",
        "skier",
        "surfer",
        "skateboarder",
        "snowboarder",
        "baby",
        "toddler",
        "rider",
        "pedestrian",
        "batter",
        "catcher",
        "tourist",
        "adult",
        "teenager",
        "chef",
    ],
    "bicycle": ["bicycle", "bike", "cyclist"],
    "car": ["car", "taxi", "sedan", "suv"],
    "motorcycle": ["motorcycle", "motorbike", "scooter", "moped"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner", "jetliner"],
    "bus": ["bus", "buses"],
    "train": ["train", "locomotive"],
    "truck": ["truck", "pickup truck"],
    "boat": ["boat", "ship", "sailboat", "canoe", "kayak", "yacht", "ferry"],
    "traffic light": ["traffic light", "stop light", "traffic signal"],
    "fire hydrant": ["fire hydrant", "hydrant"],
    "stop sign": ["stop sign"],
    "parking meter": ["parking meter"],
    "bench": ["bench", "benches"],
    "bird": ["bird", "pigeon", "seagull", "gull", "duck", "goose", "geese", "parrot", "swan", "owl"],
    "cat": ["cat", "kitten", "kitty"],
    "dog": ["dog", "puppy", "pup"],
    "horse": ["horse", "pony"],
    "sheep": ["sheep", "lamb"],
    "cow": ["cow", "cattle", "calf", "calves", "bull", "ox", "oxen"],
    "elephant": ["elephant"],
    "bear": ["bear", "polar bear", "grizzly"],
    "zebra": ["zebra"],
    "giraffe": ["giraffe"],
    "backpack": ["backpack"],
    "umbrella": ["umbrella", "parasol"],
    "handbag": ["handbag", "purse"],
    "tie": ["tie", "necktie"],
    "suitcase": ["suitcase", "luggage"],
    "frisbee": ["frisbee"],
    "skis": ["skis", "ski"],
    "snowboard": ["snowboard"],
    "sports ball": ["ball", "soccer ball", "football", "baseball", "tennis ball", "basketball"],
    "kite": ["kite"],
    "baseball bat": ["baseball bat", "bat"],
    "baseball glove": ["baseball glove", "baseball mitt", "mitt"],
    "skateboard": ["skateboard", "skate board"],
    "surfboard": ["surfboard", "surf board"],
    "tennis racket": ["tennis racket", "racket", "racquet", "tennis racquet"],
    "bottle": ["bottle"],
    "wine glass": ["wine glass", "wine glasses"],
    "cup": ["cup", "mug", "coffee cup"],
    "fork": ["fork"],
    "knife": ["knife", "knives"],
    "spoon": ["spoon"],
    "bowl": ["bowl"],
    "banana": ["banana"],
    "apple": ["apple"],
    "sandwich": ["sandwich", "sandwiches", "burger", "hamburger"],
    "orange": ["oranges"],
    "broccoli": ["broccoli"],
    "carrot": ["carrot"],
    "hot dog": ["hot dog", "hotdog"],
    "pizza": ["pizza", "pizzas"],
    "donut": ["donut", "doughnut"],
    "cake": ["cake", "cupcake"],
    "chair": ["chair", "stool"],
    "couch": ["couch", "couches", "sofa"],
    "potted plant": ["potted plant", "house plant", "houseplant", "plant"],
    "bed": ["bed"],
    "dining table": ["dining table", "table", "kitchen table"],
    "toilet": ["toilet"],
    "tv": ["tv", "television", "tvs"],
    "laptop": ["laptop"],
    "mouse": ["computer mouse", "mouse"],
    "remote": ["remote", "remote control", "controller"],
    "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "cellphone", "phone", "smartphone", "mobile phone"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove"],
    "toaster": ["toaster"],
    "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"],
    "book": ["book", "books"],
    "clock": ["clock"],
    "vase": ["vase"],
    "scissors": ["scissors"],
    "teddy bear": ["teddy bear", "teddy"],
    "hair drier": ["hair drier", "hair dryer", "blow dryer"],
    "toothbrush": ["toothbrush"],
}


def regular_plural(word: str) -> str:
    """English plural by the regular rules (bus -> buses, lady -> ladies, dog -> dogs); irregular words are
    listed where they matter (here in SYNONYMS, in data/grounded_questions.py as IRREGULAR_PLURALS)."""
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _forms(phrase: str) -> list[str]:
    """The phrase and its plural (on the last word), as caption words: 'dog' -> 'dog', 'dogs'."""
    *head, last = phrase.split()
    return [phrase, " ".join([*head, regular_plural(last)])]


def _pattern(phrases: list[str]) -> re.Pattern:
    forms = sorted({f for p in phrases for f in _forms(p)}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(f) for f in forms) + r")\b")


_PATTERNS = {category: _pattern(words) for category, words in SYNONYMS.items()}
_LONGER = {  # per category, other categories' phrases: "teddy bear" is no "bear", "hot dog" no "dog"
    category: _pattern([p for other, ps in SYNONYMS.items() if other != category for p in ps if " " in p])
    for category in SYNONYMS
}


def categories_named(caption: str) -> set[str]:
    """COCO categories one caption names (lower-cased, whole words; a longer category phrase wins)."""
    text = " " + re.sub(r"[^a-z ]+", " ", caption.lower()) + " "
    named = set()
    for category, pattern in _PATTERNS.items():
        blanked = _LONGER[category].sub(lambda m: "_" * len(m.group()), text)  # "teddy bear" hides "bear"
        if pattern.search(blanked):
            named.add(category)
    return named


def objects_from_captions(captions: list[str], min_captions: int = 2) -> list[str]:
    """Categories named by at least `min_captions` of the captions, sorted; [] when none is."""
    counts: dict[str, int] = {}
    for caption in captions:
        for category in categories_named(caption):
            counts[category] = counts.get(category, 0) + 1
    return sorted(c for c, n in counts.items() if n >= min_captions)


STATED_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
# a number's noun comes within three words of it ("two large brown dogs"), never past one of these ("two men and
# a dog" counts the men, not the dog). "one" and "a" are left out: "one of the", "a pair of".
_PHRASE_ENDS = {"and", "with", "of", "on", "in", "at", "to", "by", "near", "next", "from", "for", "while", "that"}
_PHRASE_ENDS |= {"who", "are", "is", "sitting", "standing", "riding", "walking", "playing", "holding"}


def numbers_stated(caption: str) -> dict[str, int]:
    """{category: number} for each 'NUMBER ... noun' of one caption whose noun names a COCO category."""
    tokens = re.sub(r"[^a-z ]+", " ", caption.lower()).split()
    out = {}
    for i, token in enumerate(tokens):
        if token not in STATED_NUMBERS:
            continue
        for j in range(i + 1, min(i + 4, len(tokens))):
            if tokens[j] in _PHRASE_ENDS:
                break
            new = categories_named(" ".join(tokens[i + 1 : j + 1])) - categories_named(" ".join(tokens[i + 1 : j]))
            if new:  # the first category the phrase names, e.g. "traffic lights" once both words are in
                out.setdefault(min(new), STATED_NUMBERS[token])
                break
    return out


def counts_from_captions(captions: list[str], min_captions: int = 2) -> dict[str, int]:
    """{category: number} where at least `min_captions` captions state the same number for it ("two dogs") and no
    other number is stated as often: a second, weaker source of count answers for photos without boxes (COCO
    boxes cover 94 of coco2017-val's 2,278 photos; their count answers are mostly 1)."""
    votes: dict[str, dict[int, int]] = {}
    for caption in captions:
        for category, n in numbers_stated(caption).items():
            votes.setdefault(category, {}).setdefault(n, 0)
            votes[category][n] += 1
    out = {}
    for category, by_number in votes.items():
        ranked = sorted(by_number.items(), key=lambda kv: -kv[1])
        if ranked[0][1] >= min_captions and (len(ranked) == 1 or ranked[1][1] < ranked[0][1]):
            out[category] = ranked[0][0]
    return out
