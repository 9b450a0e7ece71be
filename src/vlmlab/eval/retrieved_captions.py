"""Evaluating a SmallCap-style run (data.retrieved_captions): does the caption follow the image or the text?

Such a run sees two things, the image and the captions retrieved for it, so each gets its own swap:
- model: its image and its own retrieved captions;
- swapped image: another image (a fixed derangement), this image's retrieved captions;
- swapped retrieved captions: this image, the captions retrieved for another one;
- no image: no visual tokens, this image's retrieved captions (the text route alone).
A captioner that copies the retrieved text scores as well under a swapped image as with its own and collapses
under swapped captions; one that reads the image does the reverse. The NLL probes say the same per token:
visual gain (swapped image vs true) and text gain (swapped retrieved captions vs true).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.pairs import SplitFeatures
from ..data.retrieval_prompt import CaptionDatastore, retrieval_messages, with_retrieved_captions
from ..model.nll import derangement, validation_loss
from .captioning import generation_settings, nll_probes, score_captions

CONTROL_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "cider_deranged", "distinct_share")


@torch.no_grad()
def chat_all(model, features: torch.Tensor | None, conversations, batch_size: int, desc: str, **settings):
    out = []
    for start in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        tokens = None if features is None else features[start : start + batch_size].float()
        out += model.chat_from_tokens(tokens, conversations[start : start + batch_size], **settings)
    return out


def evaluate_split_with_retrieved_captions(
    model,
    split: SplitFeatures,
    train: SplitFeatures,
    label: str,
    batch_size: int = 16,
    seed: int = 0,
    use_java: bool | None = None,
    **generate_kwargs,
) -> dict[str, dict]:
    """Rows `label`, `label, swapped image`, `label, swapped retrieved captions`, `label, no image`."""
    n = len(split.samples)
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 readable images, got {n}")
    k = model.cfg.data.retrieved_captions
    retrieved = CaptionDatastore(train).retrieve(split, k)
    order = derangement(n, seed)
    settings = generation_settings(model, **generate_kwargs)
    own = [retrieval_messages(r) for r in retrieved]
    others = [own[j] for j in order]
    captions = chat_all(model, split.features, own, batch_size, "captioning", **settings)
    image_swapped = chat_all(model, split.features[order], own, batch_size, "captioning swapped images", **settings)
    text_swapped = chat_all(model, split.features, others, batch_size, "captioning swapped retrieved text", **settings)
    no_image = chat_all(model, None, own, batch_size, "captioning without image", **settings)

    main = score_captions(split, captions, image_swapped, order, use_java)
    main["text_swap_changed_share"] = sum(a != b for a, b in zip(captions, text_swapped)) / n
    with_own = with_retrieved_captions(split, retrieved)
    main.update(nll_probes(model, with_own, batch_size, order))
    with_others = with_retrieved_captions(split, [retrieved[j] for j in order])
    main["nll_swapped_text"] = validation_loss(model, with_others, batch_size, None)
    main["retrieved_text_gain"] = main["nll_swapped_text"] - main["nll_true"]
    main["generation"] = settings | {"retrieved_captions": k}
    for i, example in enumerate(main["examples"]):
        example["retrieved"] = retrieved[i]
    rows = {label: main}
    for name, caps in (
        ("swapped image", image_swapped),
        ("swapped retrieved captions", text_swapped),
        ("no image", no_image),
    ):
        scored = score_captions(split, caps, caps, order, use_java)
        main[f"cider_{name.replace(' ', '_')}"] = scored["CIDEr-D"]  # beside the model's, e.g. in results.csv
        rows[f"{label}, {name}"] = {key: scored[key] for key in CONTROL_KEYS if key in scored} | {
            "images": n,
            "most_repeated_caption": scored["most_repeated_caption"],
            "most_repeated_count": scored["most_repeated_count"],
            "examples": scored["examples"],
        }
    return rows
