"""SmallCap in miniature: the captions of the training images most like this one, written into the prompt.

SmallCap (Ramos et al., CVPR 2023) retrieves the k = 4 captions nearest to an image from a datastore and writes
them into the prompt of a frozen GPT-2 that sees the image through a small trained cross-attention: 1.8-7M
trained parameters, COCO CIDEr 121.8. The field's answer to small budgets, and a natural arm here, where
nearest-neighbour retrieval alone captions as well as the trained model (README, the photo recipe).

Here the search is image to image (we have no joint image-text space): the k nearest training images by cosine
of the frozen encoder's pooled features, the measure of the retrieval baseline, one human caption each (the
first listed). The datastore is always the run's own training split; a training image never retrieves itself,
or the model would learn to copy its own reference. The retrieved captions go into the user turn after the
visual tokens, and the caption is the assistant's reply (conversation.py supervises only it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pairs import SplitFeatures

INSTRUCTION = "Similar images show:"
QUESTION = "Write a short caption for this image."


def retrieval_messages(retrieved: list[str], caption: str | None = None) -> list[dict]:
    """The user turn (image, retrieved captions, instruction) and, for training, the caption as the reply."""
    listed = "\n".join(f"- {c.strip()}" for c in retrieved)
    messages = [{"role": "user", "content": f"<image>\n{INSTRUCTION}\n{listed}\n{QUESTION}"}]
    if caption is not None:
        messages.append({"role": "assistant", "content": caption.strip()})
    return messages


class CaptionDatastore:
    """The training split's pooled image features and one caption per image: what retrieval searches."""

    def __init__(self, train: SplitFeatures):
        if not train.samples:
            raise ValueError("retrieved captions need a non-empty training split to search")
        self.keys = F.normalize(train.features.float().mean(dim=1), dim=-1)
        self.image_ids = [s.image_id for s in train.samples]
        self.captions = [s.captions[0] for s in train.samples]

    def retrieve(self, split: SplitFeatures, k: int, batch_size: int = 256) -> list[list[str]]:
        """For each image of a split, the captions of its k nearest training images, nearest first; an image
        never retrieves itself (same image id)."""
        return self.nearest(split.features, k, [s.image_id for s in split.samples], batch_size)

    def nearest(
        self, image_tokens: torch.Tensor, k: int, image_ids: list | None = None, batch_size: int = 256
    ) -> list[list[str]]:
        """Image tokens [M, N, D] -> the captions of each one's k nearest training images. `image_ids` that the
        datastore holds are left out of their own neighbours; None (a new photo) leaves nothing out."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > len(self.image_ids) - 1:
            raise ValueError(f"k = {k} but the datastore holds {len(self.image_ids)} images")
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        out = []
        for start in range(0, len(image_tokens), batch_size):
            queries = F.normalize(image_tokens[start : start + batch_size].float().mean(dim=1), dim=-1)
            similarity = queries @ self.keys.T
            for i, image_id in enumerate((image_ids or [])[start : start + batch_size]):
                if image_id in row_of:
                    similarity[i, row_of[image_id]] = -torch.inf
            out += [[self.captions[j] for j in row] for row in similarity.topk(k, dim=1).indices.tolist()]
        return out


def training_datastore(cfg, cache) -> CaptionDatastore:
    """A run's own training split as the datastore (through the feature cache): what captioning a new photo
    retrieves from. The run's training data must be readable here; if not, the error says so."""
    from .pairs import load_split_features

    try:
        train = load_split_features(cfg, cache, splits=("train",))["train"]
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"this run writes captions from the captions of its nearest training images (data.retrieved_captions), "
            f"so it needs its training data {cfg.data.datasets} readable here: {e}"
        ) from e
    return CaptionDatastore(train)


def with_retrieved_captions(split: SplitFeatures, retrieved: list[list[str]]) -> SplitFeatures:
    """The split's (row, caption) pairs as (row, conversation): image + retrieved[row] in, the caption out."""
    if len(retrieved) != len(split.samples):
        raise ValueError(f"{len(retrieved)} retrieved lists for {len(split.samples)} images")
    pairs = [(row, retrieval_messages(retrieved[row], caption)) for row, caption in split.pairs]
    return SplitFeatures(split.samples, split.features, pairs)
