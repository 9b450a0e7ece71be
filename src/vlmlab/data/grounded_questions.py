"""Questions with known answers, built from what the annotations say is in each image.

Two sources of ground truth: COCO instances (object categories and boxes) and the synthetic world's
scene description (colour, shape, size, grid position of each object). From them:

- short-answer questions (VQA style, answer types yes/no | number | other): presence, counting,
  left/right of one object from another (box centres), and for the synthetic world colour, shape, size,
  position;
- conversations (LLaVA style): a brief description (a human caption) followed by a few of those questions;
- POPE, exactly as its authors build it: images with >= 3 annotated categories, 3 positives per image, each
  followed by one negative sampled at random, among the most frequent categories (popular) or among those
  that co-occur most with the image's objects (adversarial); "Is there a/an {object} in the image?";
- MMBench-style 4-option questions (which object is in the image, how many), options rotated for CircularEval.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .caption_objects import counts_from_captions, regular_plural
from .caption_objects import objects_from_captions as named_objects
from .formats import CaptionSample, InputError
from .synthetic import COLOURS, POSITIONS, SHAPES

IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass
class ImageFacts:
    """What the annotations say is in one image: objects with a category and (optionally) a box."""

    sample: CaptionSample
    objects: list[dict]  # {"name": str, "cx": float in [0, 1] or None, plus synthetic attributes}
    synthetic: bool = False
    from_captions: bool = False  # named by the captions (caption_objects.py): presence only, no number or box
    caption_counts: dict[str, int] = field(default_factory=dict)  # numbers the captions agree on ("two dogs")

    @property
    def counts(self) -> Counter:
        """Objects per category (a crowd region counts once here: presence holds, its number is unknown)."""
        return Counter(o["name"] for o in self.objects)

    @property
    def countable(self) -> set[str]:
        """Categories whose number is known: none of their annotations is a crowd region."""
        return {o["name"] for o in self.objects} - {o["name"] for o in self.objects if o.get("crowd")}

    def unique_objects(self) -> list[tuple[dict, str]]:
        """Synthetic objects with a description that fits no other object: (object, 'the circle' / 'the large circle')."""
        out = []
        for o in self.objects:
            same_shape = [x for x in self.objects if x["shape"] == o["shape"]]
            same_size = [x for x in same_shape if x["size"] == o["size"]]
            if len(same_shape) == 1:
                out.append((o, f"the {o['shape']}"))
            elif len(same_size) == 1:
                out.append((o, f"the {o['size']} {o['shape']}"))
        return out


@dataclass
class TaskQuestion:
    image: str  # absolute image path
    question: str
    answer: str  # the short answer (VQA style)
    answer_type: str  # yes/no | number | other
    question_type: str  # e.g. "is there a", "how many", "what color is the"


def article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return IRREGULAR_PLURALS.get(word) or regular_plural(word)


def coco_instances(samples: list[CaptionSample]) -> dict[str, list[dict]]:
    """image path -> objects from the COCO instances file beside each sample's captions file (if any)."""
    by_folder: dict[Path, list[CaptionSample]] = defaultdict(list)
    for s in samples:
        if "coco_split" in s.meta:
            by_folder[Path(s.image_path).parent].append(s)
    out: dict[str, list[dict]] = {}
    for folder, group in by_folder.items():
        path = folder.parent / "annotations" / f"instances_{group[0].meta['coco_split']}.json"
        if not path.exists():
            continue
        objects = read_instances(path)
        for s in group:
            if s.meta["file_name"] in objects:
                out[s.image_path] = objects[s.meta["file_name"]]
    return out


BOX_SLACK = 1.0  # pixels a box may reach past its image's edge: rounding (boxes of rescaled photos pass by 0.43)


def read_instances(path: Path) -> dict[str, list[dict]]:
    """A COCO instances file -> objects per image file name, every record checked first.

    The answers of every question make-tasks writes come from these records, so a record that cannot be
    what it says (no box, a category or image the file does not list, a box that is not finite, has a negative
    size or lies outside its image) refuses the whole file, naming the record: skipped, it would make the
    counts and the presence answers of its image wrong without a word."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); JSON files must be UTF-8") from e
    except json.JSONDecodeError as e:
        what = "empty" if not path.read_bytes().strip() else f"JSON error at line {e.lineno}: {e.msg}"
        raise InputError(f"{path}: not a COCO instances file ({what})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a COCO instances file (a {type(data).__name__}, not an object)")
    for key in ("categories", "images", "annotations"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{path}: not a COCO instances file ({key!r} is {data.get(key)!r}, not a list)")
    names, sizes = {}, {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not _hashable(c.get("id")):
            raise InputError(f"{path}: categories[{i}] needs an id and a name, got {c!r:.120}")
        names[c["id"]] = c["name"]
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or not _hashable(im.get("id")):
            raise InputError(f"{path}: images[{i}] needs an id and a file_name, got {im!r:.120}")
        width, height = im.get("width"), im.get("height")
        if not all(_finite(v) and v > 0 for v in (width, height)):
            raise InputError(f"{path}: images[{i}] (id {im['id']!r}) has width {width!r}, height {height!r}")
        sizes[im["id"]] = (im["file_name"], width, height)
    objects: dict[str, list[dict]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]" + (f" (id {ann['id']!r})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            raise InputError(f"{where} is {ann!r:.80}, not a record")
        missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise InputError(f"{where} lacks {', '.join(map(repr, missing))}")
        if not _hashable(ann["category_id"]) or ann["category_id"] not in names:
            raise InputError(f"{where}: category_id {ann['category_id']!r} is not in the file's categories")
        if not _hashable(ann["image_id"]) or ann["image_id"] not in sizes:
            raise InputError(f"{where}: image_id {ann['image_id']!r} is not in the file's images")
        file_name, width, height = sizes[ann["image_id"]]
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)):
            raise InputError(f"{where}: bbox {box!r:.80} is not 4 finite numbers [x, y, width, height]")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise InputError(f"{where}: bbox {box} has a negative width or height")
        if x < -BOX_SLACK or y < -BOX_SLACK or x + w > width + BOX_SLACK or y + h > height + BOX_SLACK:
            raise InputError(f"{where}: bbox {box} lies outside its image ({width} x {height}, {file_name})")
        obj = {"name": names[ann["category_id"]], "cx": (x + w / 2) / width}
        if ann.get("iscrowd"):  # a crowd region: the category is present, its number is not known
            obj |= {"crowd": True, "cx": None}
        objects[file_name].append(obj)
    return objects


def _hashable(value) -> bool:
    """An id a JSON file can give: a number or a string (not a list, a mapping or null)."""
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A JSON number that is one: not a boolean, not NaN or Infinity (Python's json reads both)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def image_facts(
    samples: list[CaptionSample], objects_from_captions: bool = False, min_captions: int = 2, counts: bool = False
) -> list[ImageFacts]:
    """Facts for the samples whose objects are annotated (synthetic world: all; COCO: those in instances).

    objects_from_captions: a photo without annotations gets the COCO categories its captions name (at least
    `min_captions` of them), as objects whose number and place are unknown; photos whose captions name none
    are left out. counts: such a photo also keeps the numbers `min_captions` of its captions agree on
    (caption_count_questions asks them; every other question about it stays as without)."""
    coco = coco_instances(samples)
    out = []
    for s in samples:
        if "objects" in s.meta:
            objects = [
                {**o, "name": o["shape"], "cx": [0.2, 0.5, 0.8][POSITIONS.index(o["position"]) % 3]}
                for o in s.meta["objects"]
            ]
            out.append(ImageFacts(s, objects, synthetic=True))
        elif s.image_path in coco:
            out.append(ImageFacts(s, coco[s.image_path]))
        elif objects_from_captions and (named := named_objects(s.captions, min_captions)):
            objects = [{"name": n, "cx": None, "crowd": True} for n in named]
            counted = counts_from_captions(s.captions, min_captions) if counts else {}
            out.append(ImageFacts(s, objects, from_captions=True, caption_counts=counted))
    return out


def short_questions(facts: ImageFacts, vocabulary: list[str], rng: random.Random) -> list[TaskQuestion]:
    """Short-answer questions about one image; `vocabulary` is every category name (for absent objects)."""
    img, counts = facts.sample.image_path, facts.counts
    qs = []
    present = sorted(counts)
    absent = sorted(set(vocabulary) - set(counts))
    name = rng.choice(present)
    qs.append(TaskQuestion(img, f"Is there {article(name)} in the image?", "yes", "yes/no", "is there a"))
    if absent:
        other = rng.choice(absent)
        qs.append(TaskQuestion(img, f"Is there {article(other)} in the image?", "no", "yes/no", "is there a"))
    countable = sorted(facts.countable)
    if countable:
        name = name if name in facts.countable else rng.choice(countable)
        qs.append(TaskQuestion(img, f"How many {plural(name, 2)} are there?", str(counts[name]), "number", "how many"))
    singles = [o for o in facts.objects if counts[o["name"]] == 1 and o.get("cx") is not None]
    pairs = [(a, b) for a in singles for b in singles if a["name"] != b["name"] and abs(a["cx"] - b["cx"]) > 0.1]
    if pairs:
        a, b = rng.choice(pairs)
        side = "left" if a["cx"] < b["cx"] else "right"
        q = f"Is the {a['name']} to the left or to the right of the {b['name']}?"
        qs.append(TaskQuestion(img, q, side, "other", "left or right"))
    if facts.synthetic:
        described = facts.unique_objects()  # only objects a phrase can name unambiguously
        if described:
            o, the = rng.choice(described)
            qs += [
                TaskQuestion(img, f"What colour is {the}?", o["colour"], "other", "what color is the"),
                TaskQuestion(img, f"Is {the} small or large?", o["size"], "other", "what size is the"),
                TaskQuestion(img, f"Where is {the}?", o["position"], "other", "where is the"),
            ]
        if len(counts) == 1:  # one kind of shape: its name is the only right answer
            qs.append(TaskQuestion(img, "What shape is in the image?", present[0], "other", "what shape"))
    return qs


def caption_count_questions(facts: ImageFacts) -> list[TaskQuestion]:
    """'How many dogs are there?' for each number the photo's captions agree on (image_facts(counts=True))."""
    return [
        TaskQuestion(facts.sample.image_path, f"How many {plural(name, 2)} are there?", str(n), "number", "how many")
        for name, n in sorted(facts.caption_counts.items())
    ]


def describe_counts(counts: Counter, countable: set[str] | None = None) -> str:
    countable = set(counts) if countable is None else countable
    parts = [
        (f"{n if n > 1 else 'one'} {plural(name, n)}" if name in countable else f"many {plural(name, 2)}")
        for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    return listed(parts)


def listed(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_objects(facts: ImageFacts) -> str:
    """The objects with their counts; objects named by captions (number unknown) each with an article."""
    if not facts.from_captions:
        return describe_counts(facts.counts, facts.countable)
    return listed([article(n) for n in sorted(facts.counts)])


def conversation(facts: ImageFacts, vocabulary: list[str], rng: random.Random, turns: int = 3) -> list[dict]:
    """A LLaVA-style conversation: a brief description, the objects with counts, then short questions."""
    caption = rng.choice(facts.sample.captions)
    msgs = [
        {"role": "user", "content": "<image>\nDescribe the image briefly."},
        {"role": "assistant", "content": caption[:1].upper() + caption[1:]},
        {"role": "user", "content": "What objects are in the image?"},
        {"role": "assistant", "content": describe_objects(facts).capitalize() + "."},
    ]
    questions = short_questions(facts, vocabulary, rng)
    for q in rng.sample(questions, k=min(turns, len(questions))):
        msgs += [{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answer.capitalize() + "."}]
    return msgs


VQA_SUFFIX = "\nAnswer the question using a single word or number."  # LLaVA-1.5's short-answer prompt
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt


def vqa_conversation(q: TaskQuestion) -> list[dict]:
    return [
        {"role": "user", "content": "<image>\n" + q.question + VQA_SUFFIX},
        {"role": "assistant", "content": q.answer},
    ]


def choice_conversation(question: str, options: list[str], right: int) -> list[dict]:
    """A multiple-choice question as LLaVA-1.5 trains on A-OKVQA's: lettered options, the letter as the answer."""
    lettered = "\n".join(f"{'ABCDEFGH'[i]}. {option}" for i, option in enumerate(options))
    return [
        {"role": "user", "content": f"<image>\n{question}\n{lettered}{MC_SUFFIX}"},
        {"role": "assistant", "content": "ABCDEFGH"[right]},
    ]


def pope_questions(
    facts: list[ImageFacts],
    setting: str,
    seed: int = 0,
    per_image: int = 3,
    min_categories: int = 3,
    population: list[ImageFacts] | None = None,
):
    """POPE items [(image, question, label)]: positives, each followed by a negative of the given setting.

    Object frequencies (popular) and co-occurrences (adversarial) are counted over `population` (default:
    `facts`), as the POPE authors count them over the whole annotated set, not the evaluation images alone.
    """
    if setting not in ("random", "popular", "adversarial"):
        raise ValueError(f"POPE setting {setting!r}: random | popular | adversarial")
    rng = random.Random(f"pope-{setting}-{seed}")
    population = population or facts
    # sorted: equal frequencies tie-break alike in every process (a set's order follows the string hash seed)
    frequency = Counter(name for f in population for name in sorted(set(f.counts)))
    vocabulary = sorted(frequency)
    cooccur: dict[str, Counter] = defaultdict(Counter)
    for f in population:
        for a in f.counts:
            for b in f.counts:
                if a != b:
                    cooccur[a][b] += 1
    items = []
    for f in facts:
        present = sorted(f.counts)
        if len(present) < min_categories:
            continue
        positives = rng.sample(present, per_image) if len(present) >= per_image else present
        if setting == "random":
            candidates = rng.sample([c for c in vocabulary if c not in f.counts], k=len(vocabulary) - len(present))
        elif setting == "popular":
            candidates = [c for c, _ in frequency.most_common() if c not in f.counts]
        else:
            together = Counter()
            for p in present:
                together.update(cooccur[p])
            candidates = [c for c, _ in together.most_common() if c not in f.counts]
            candidates += [c for c, _ in frequency.most_common() if c not in f.counts and c not in candidates]
        for pos, neg in zip(positives, candidates):
            items.append((f.sample.image_path, f"Is there {article(pos)} in the image?", "yes"))
            items.append((f.sample.image_path, f"Is there {article(neg)} in the image?", "no"))
    return items


def choice_questions(facts: ImageFacts, vocabulary: list[str], rng: random.Random) -> list[tuple[str, list[str], int]]:
    """MMBench-style 4-option questions: (question, options, right index) before rotation."""
    out = []
    absent = sorted(set(vocabulary) - set(facts.counts))
    if len(absent) >= 3:
        right = rng.choice(sorted(facts.counts))
        options = rng.sample(absent, 3) + [right]
        rng.shuffle(options)
        out.append(("Which of these objects is in the image?", options, options.index(right)))
    if not facts.countable:
        return out
    name = rng.choice(sorted(facts.countable))
    n = facts.counts[name]
    numbers = [str(n)] + [str(x) for x in rng.sample([k for k in range(1, 11) if k != n], 3)]
    rng.shuffle(numbers)
    out.append((f"How many {plural(name, 2)} are there?", numbers, numbers.index(str(n))))
    described = facts.unique_objects() if facts.synthetic else []
    if described:
        o, the = rng.choice(described)
        others = {x["colour"] for x in facts.objects}  # no distractor is the colour of something in the picture
        absent = [c for c in COLOURS if c not in others]  # four objects of four colours leave two: 3 options then
        colours = [o["colour"]] + rng.sample(absent, min(3, len(absent)))
        rng.shuffle(colours)
        out.append((f"What colour is {the}?", colours, colours.index(o["colour"])))
    return out


def vocabulary_of(facts: list[ImageFacts]) -> list[str]:
    if facts and all(f.synthetic for f in facts):
        return list(SHAPES)
    return sorted({name for f in facts for name in f.counts})
