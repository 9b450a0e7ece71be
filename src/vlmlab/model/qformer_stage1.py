"""BLIP-2 stage 1: the Q-Former learns vision-language representations before it ever feeds the LLM.

The queries and a text side share the Q-Former's self-attention (text positions skip cross-attention and
have their own FFN); three losses as in LAVIS `blip2_qformer.py`, written here from the paper:
  ITC  image-text contrastive: similarity = max over queries of (query, [CLS]) cosine, learned temperature,
       image->text and text->image cross-entropy;
  ITM  image-text matching: a 2-way head on the query outputs (logits averaged over queries), positives plus
       one hard negative per image and per text, sampled from the ITC similarities (never a positive);
  ITG  image-grounded generation: the text decoded from the queries under the causal mask (queries never
       see the text; text token t sees every query and the text up to t).

Names: the Q-Former is `connector.*`, exactly the VLM connector's names (stage 2 loads it with
train.init_from and nothing else); the text side and heads are `stage1.*` (reported unused at stage 2).

Text embedding: the frozen LLM's tokenizer and input embeddings (a frozen buffer, not saved) through a
learned projection to the Q-Former width. Why not a fresh embedding table: 49k x width parameters learned
from a few thousand captions would leave most words at noise; the LLM's table already places words
sensibly, and the ITG output reuses it (tied, as BLIP-2 ties its decoder to its word embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qformer import QFormerConnector, TextFFN


class Stage1TextSide(nn.Module):
    """Everything of stage 1 that is not the connector: text embedding, text FFNs, ITC/ITM/ITG heads."""

    def __init__(self, lm_embeddings: torch.Tensor, width: int, depth: int, ffn_mult: int, max_text_tokens: int):
        super().__init__()
        lm_dim = lm_embeddings.shape[1]
        self.register_buffer("lm_embeddings", lm_embeddings.detach().clone(), persistent=False)
        self.embed_in = nn.Sequential(nn.LayerNorm(lm_dim), nn.Linear(lm_dim, width))
        self.text_pos = nn.Parameter(torch.randn(1, max_text_tokens + 1, width) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # first token for ITC / ITM (BERT's [CLS])
        self.dec = nn.Parameter(torch.randn(1, 1, width) * 0.02)  # first token for ITG (BLIP-2's [DEC])
        self.text_ffn = nn.ModuleList(TextFFN(width, ffn_mult, 0.0) for _ in range(depth))
        self.vision_proj = nn.Linear(width, width)
        self.text_proj = nn.Linear(width, width)
        self.log_temp = nn.Parameter(torch.tensor(0.07).log())  # ITC temperature, learned (CLIP, BLIP-2: 0.07)
        self.itm_head = nn.Linear(width, 2)
        self.lm_out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, lm_dim))  # ITG: tied to LLM embeddings

    def embed(self, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> [first][tokens] embedded [B, T+1, W]."""
        tokens = self.embed_in(self.lm_embeddings[ids])
        x = torch.cat([first.expand(ids.shape[0], -1, -1), tokens], dim=1)
        return x + self.text_pos[:, : x.shape[1]]

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temp.exp().clamp(0.001, 0.5)


def sample_hard_negatives(similarity: torch.Tensor, positive: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, one column drawn with probability softmax(similarity) over the NON-positive columns
    (a hard negative: similar yet not matching). -> [rows] indices, -1 where a row has no negative at all
    (every column a positive, e.g. a batch of one image's captions)."""
    weights = similarity.detach().float().softmax(dim=1).masked_fill(positive, 0.0)
    has_negative = ~positive.all(dim=1)
    weights[~has_negative] = 1.0  # placeholder so multinomial accepts the row; its pick is discarded
    weights = weights + has_negative[:, None] * (~positive) * 1e-12  # underflow cannot leave a row empty
    picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.where(has_negative, picks, torch.full_like(picks, -1))


class QFormerStage1(nn.Module):
    """The stage-1 model: connector (the VLM's Q-Former, same names) + stage1 (text side and heads)."""

    def __init__(self, connector: QFormerConnector, lm_embeddings: torch.Tensor, tokenizer, settings):
        super().__init__()
        self.connector, self.tokenizer, self.settings = connector, tokenizer, settings
        layer = connector.layers[0]
        width = connector.queries.shape[-1]
        ffn_mult = layer.ffn[0].out_features // width
        self.stage1 = Stage1TextSide(lm_embeddings, width, len(connector.layers), ffn_mult, settings.max_text_tokens)
        self.connector.projection.requires_grad_(False)  # stage 1 never talks to the LLM

    @property
    def device(self) -> torch.device:
        return self.connector.queries.device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, T] (caption tokens then the end token, cut to max_text_tokens) and padding [B, T]."""
        tok = self.tokenizer
        end = tok.eos_token_id
        rows = [
            tok(" " + c.strip(), add_special_tokens=False)["input_ids"][: self.settings.max_text_tokens - 1] + [end]
            for c in captions
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), end, dtype=torch.long)
        padding = torch.ones(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            padding[i, : len(r)] = False
        return ids.to(self.device), padding.to(self.device)

    def encode(self, image_tokens, ids, padding, mode: str, first: torch.Tensor):
        """-> (query states [B, Q, W], text states [B, 1+T, W]) under one of the stage-1 masks."""
        text = self.stage1.embed(ids, first)
        padding = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1)  # [CLS]/[DEC] is never padding
        return self.connector.encode_with_text(image_tokens, text, padding, mode, self.stage1.text_ffn)

    def similarity(self, image_tokens, ids, padding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC: -> (similarity [B_img, B_txt] = max over queries of cosine, image feats, text feats)."""
        queries, text = self.encode(image_tokens, ids, padding, "itc", self.stage1.cls)
        image_feats = F.normalize(self.stage1.vision_proj(queries), dim=-1)  # [B, Q, W]
        text_feat = F.normalize(self.stage1.text_proj(text[:, 0]), dim=-1)  # [B, W]
        sim = torch.einsum("iqw,tw->itq", image_feats, text_feat).max(dim=-1).values
        return sim, image_feats, text_feat

    def itm_logits(self, image_tokens, ids, padding) -> torch.Tensor:
        """[B, 2] (no match, match) for paired rows: the head on every query output, averaged over queries."""
        queries, _ = self.encode(image_tokens, ids, padding, "itm", self.stage1.cls)
        return self.stage1.itm_head(queries).mean(dim=1)

    def forward(self, image_tokens: torch.Tensor, captions: list[str], image_ids: list[str]) -> dict[str, torch.Tensor]:
        """-> {"itc", "itm", "itg" (those switched on), "loss" (their sum)}; image_ids mark which pairs of the
        batch are positives (two captions of one image are both positives of it)."""
        s = self.settings
        image_tokens = image_tokens.to(self.device, torch.float32)
        ids, padding = self.tokenize(captions)
        same = torch.tensor([[a == b for b in image_ids] for a in image_ids], device=self.device)
        out: dict[str, torch.Tensor] = {}
        sim = None
        if s.itc or s.itm:
            sim, _, _ = self.similarity(image_tokens, ids, padding)
        if s.itc:
            logits = sim / self.stage1.temperature
            targets = same.float() / same.float().sum(dim=1, keepdim=True)
            out["itc"] = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        if s.itm:
            out["itm"] = self.itm_loss(image_tokens, ids, padding, sim, same)
        if s.itg:
            out["itg"] = self.itg_loss(image_tokens, ids, padding)
        out["loss"] = sum(out.values())
        return out

    def itm_loss(self, image_tokens, ids, padding, sim, same) -> torch.Tensor:
        """Positives, plus for each image a hard negative text and for each text a hard negative image."""
        neg_text = sample_hard_negatives(sim, same)  # per image row
        neg_image = sample_hard_negatives(sim.t(), same)  # per text row
        rows_i = torch.nonzero(neg_text >= 0).squeeze(1)
        rows_t = torch.nonzero(neg_image >= 0).squeeze(1)
        batch = torch.arange(len(ids), device=self.device)
        images = torch.cat([batch, rows_i, neg_image[rows_t]])
        texts = torch.cat([batch, neg_text[rows_i], rows_t])
        labels = torch.cat(
            [torch.ones_like(batch), torch.zeros(len(rows_i) + len(rows_t), dtype=torch.long, device=self.device)]
        )
        logits = self.itm_logits(image_tokens[images], ids[texts], padding[texts])
        return F.cross_entropy(logits, labels)

    def itg_logits(self, image_tokens, ids, padding) -> torch.Tensor:
        """[B, T, vocab]: position t ([DEC] then tokens < t) predicts token t."""
        _, text = self.encode(image_tokens, ids, padding, "itg", self.stage1.dec)
        return self.stage1.lm_out(text[:, :-1]) @ self.stage1.lm_embeddings.t()

    def itg_loss(self, image_tokens, ids, padding) -> torch.Tensor:
        logits = self.itg_logits(image_tokens, ids, padding)
        return F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(padding, -100).flatten())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: connector.* (the VLM's names) and stage1.* (the lm_embeddings buffer is the
        frozen LLM's, not saved)."""
        state = {f"connector.{k}": v for k, v in self.connector.state_dict().items()}
        state.update({f"stage1.{k}": v for k, v in self.stage1.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.connector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("connector.")})
        self.stage1.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("stage1.")})


def build_stage1(cfg) -> tuple[QFormerStage1, object]:
    """-> (stage-1 model, vision encoder for the feature cache). The connector is built as build_vlm builds
    it (same seed point), so a stage-1 run and a scratch caption run of one seed start from one Q-Former."""
    from .connector import build_connector
    from .language_model import base_causal_lm, embedding_rms, load_language_model
    from .vision import build_vision_encoder

    vision = build_vision_encoder(cfg.vision.name, cfg.vision.image_size)
    lm, tokenizer = load_language_model(cfg.lm.name)
    torch.manual_seed(cfg.train.seed)
    embeddings = base_causal_lm(lm).get_input_embeddings().weight.detach()
    num_image_tokens = vision.grid_size[0] * vision.grid_size[1]
    connector = build_connector(cfg.connector, vision.out_dim, num_image_tokens, embeddings.shape[1], embedding_rms(lm))
    model = QFormerStage1(connector, embeddings, tokenizer, cfg.qformer_stage1)
    del lm
    return model, vision
