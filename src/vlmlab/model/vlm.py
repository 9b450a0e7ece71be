"""The composed vision-language model: frozen encoder -> connector -> frozen LLM (+ LoRA).

    image --vision--> image tokens [B, N, D_img] --connector--> visual tokens [B, Q, D_lm]
    [visual tokens][prompt embeddings] --LLM--> caption
(connector.type xattn: no visual tokens in the prompt; the LLM's layers read them by cross-attention, xattn.py)

Training usually starts from cached image tokens (features.py), so `forward` takes image tokens,
not pixels; `caption` takes images and runs the whole path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from .chat_format import end_token_for, resolve_format
from .connector import build_connector
from .context import PromptTooLong, context_length, fit_prompt, too_long
from .conversation import conversation_batch, encode_conversation
from .language_model import add_lora, base_causal_lm, choose_end_token, embedding_rms, load_language_model
from .sequence import (
    IGNORE_INDEX,
    TextBatch,
    build_generation_batch,
    build_training_batch,
    caption_token_ids,
    decode_caption,
    prompt_token_ids,
)
from .vision import build_vision_encoder
from .xattn import decoder_layers


class VLM(nn.Module):
    def __init__(self, cfg: Config, vision: nn.Module, connector: nn.Module | None, lm: nn.Module, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.connector = connector
        self.lm = lm
        self.tokenizer = tokenizer
        self.specials = choose_end_token(tokenizer, cfg.lm.chat_format, cfg.lm.end_token)
        self.prompt_ids = prompt_token_ids(tokenizer, cfg.data.prompt, cfg.lm.chat_format)
        self.caption_datastore = None  # runs with data.retrieved_captions: their training split, built on first use
        # photo path -> its image tokens, while an evaluation asks many questions of one photo (remember_images)
        self.image_token_memo: dict[str, torch.Tensor] | None = None

    # ---- building blocks -------------------------------------------------------------------
    def train(self, mode: bool = True):
        """The vision encoder stays in eval mode: it is frozen, and BatchNorm statistics must not drift."""
        super().train(mode)
        self.vision.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def blind(self) -> bool:
        """No connector (connector.type 'none'): the LLM never sees the image, whatever is passed in."""
        return self.connector is None

    def visual_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor | None:
        """Image tokens from the encoder [B, N, D_img] -> visual tokens for the LLM [B, Q, D_lm].

        Pixels [B, 3, H, W] go through the encoder first: the path of a run that trains encoder blocks
        (vision.unfreeze_last), whose features cannot come from the cache.
        """
        if self.blind:
            return None
        if image_tokens.dim() == 4:
            image_tokens = self.vision(image_tokens.to(self.device, torch.float32))
        return self.connector(image_tokens.to(self.device, torch.float32))

    def encode_images(self, images) -> torch.Tensor:
        """PIL images -> image tokens [B, N, D_img] with the frozen encoder."""
        pixels = self.vision.preprocess(images).to(self.device)
        with torch.no_grad():
            return self.vision(pixels)

    def _embed(self, visual: torch.Tensor | None, text: TextBatch, visual_first_pad: bool = False):
        """Concatenate [visual tokens][text embeddings]; visual positions are attended and never supervised."""
        embed = base_causal_lm(self.lm).get_input_embeddings()
        text_embeds = embed(text.input_ids.to(self.device))
        mask = text.attention_mask.to(self.device)
        labels = text.labels.to(self.device)
        if getattr(self.connector, "fuses_inside", False):  # xattn: the LLM's layers read it, the prompt does not
            self.connector.attach(visual, None if visual is None else text.image_present)
            return text_embeds, mask, labels
        if visual is None:
            return text_embeds, mask, labels
        batch, num_visual = visual.shape[:2]
        visual = visual.to(text_embeds.dtype)
        visual_mask = torch.ones(batch, num_visual, dtype=mask.dtype, device=mask.device)
        visual_labels = torch.full((batch, num_visual), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        if text.image_positions is not None:  # a conversation: the visual tokens go where its <image> was
            if text.image_present is not None:  # a text-only row in a batch with images: its slot is masked out
                visual_mask = visual_mask * text.image_present.to(mask.device, mask.dtype)[:, None]
            splice = [int(p) for p in text.image_positions]
            return (
                torch.stack(
                    [torch.cat([text_embeds[i, :p], visual[i], text_embeds[i, p:]]) for i, p in enumerate(splice)]
                ),
                torch.stack([torch.cat([mask[i, :p], visual_mask[i], mask[i, p:]]) for i, p in enumerate(splice)]),
                torch.stack(
                    [torch.cat([labels[i, :p], visual_labels[i], labels[i, p:]]) for i, p in enumerate(splice)]
                ),
            )
        if visual_first_pad:
            # Left-padded generation batch: move each row's padding before its visual tokens, so every
            # row reads [pad...][visual][prompt] and the answer starts at the last position.
            rows = []
            for i in range(batch):
                pad = int((mask[i] == 0).sum())
                rows.append(torch.cat([text_embeds[i, :pad], visual[i], text_embeds[i, pad:]]))
            embeds = torch.stack(rows)
            full_mask = torch.stack(
                [torch.cat([mask[i][mask[i] == 0], visual_mask[i], mask[i][mask[i] == 1]]) for i in range(batch)]
            )
            return embeds, full_mask, torch.cat([visual_labels, labels], dim=1)
        return (
            torch.cat([visual, text_embeds], dim=1),
            torch.cat([visual_mask, mask], dim=1),
            torch.cat([visual_labels, labels], dim=1),
        )

    # ---- training --------------------------------------------------------------------------
    def text_batch(self, captions: list) -> TextBatch:
        """Training batch of captions, or of conversations (lists of messages) for the instruct / vqa stages."""
        if captions and not isinstance(captions[0], str):
            return self.conversation_text_batch(captions)
        ids = [
            caption_token_ids(self.tokenizer, c, self.cfg.lm.chat_format, self.cfg.data.max_caption_tokens)
            for c in captions
        ]
        return build_training_batch(self.prompt_ids, ids, self.specials.end_id, self.specials.pad_id)

    def forward(self, image_tokens: torch.Tensor | None, text: TextBatch, reduction: str = "mean"):
        """Caption loss (next-token cross-entropy on caption + END tokens only).

        reduction='mean': one scalar, mean NLL per supervised token.
        reduction='sum': (nll_sum, token_count), for a token mean over several processes' batches.
        reduction='sum_per_sample': (nll_sum [B], token_count [B]) for probes and per-image scores.
        """
        visual = self.visual_tokens(image_tokens) if image_tokens is not None else None
        embeds, mask, labels = self._embed(visual, text)
        base = base_causal_lm(self.lm)
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Position t predicts token t+1. Only supervised positions go through the (large) vocabulary head.
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[supervised]).float()
        nll = F.cross_entropy(logits, targets[supervised], reduction="none")
        if reduction == "mean":
            return nll.mean()
        if reduction == "sum":
            return nll.sum(), supervised.sum()
        if reduction == "sum_per_sample":
            row = supervised.nonzero()[:, 0]
            sums = torch.zeros(labels.shape[0], device=nll.device).index_add_(0, row, nll)
            return sums, supervised.sum(dim=1)
        raise ValueError(f"unknown reduction {reduction!r}")

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from_tokens(
        self,
        image_tokens: torch.Tensor | None,
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        repetition_penalty: float | None = None,
    ) -> list[str]:
        """Captions from image tokens. The LLM sees only [visual tokens][prompt]: no caption, no END."""
        if self.cfg.data.retrieved_captions:  # it never learned to caption from the plain prompt
            settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, repetition_penalty=repetition_penalty)
            return self._caption_with_retrieved(image_tokens, {k: v for k, v in settings.items() if v is not None})
        batch = image_tokens.shape[0] if image_tokens is not None else (batch_size or 1)
        return self._caption_batch(image_tokens, batch, max_new_tokens, num_beams, repetition_penalty)

    def _caption_batch(self, image_tokens, batch: int, max_new_tokens, num_beams, repetition_penalty, returned=1):
        """[visual tokens][prompt] -> `returned` captions per image (the best beams, best first)."""
        text = build_generation_batch([self.prompt_ids] * batch, self.specials.pad_id)
        return self._generate(
            image_tokens,
            text,
            self.specials.end_id,
            max_new_tokens,
            num_beams,
            repetition_penalty,
            visual_first_pad=True,
            num_return_sequences=returned,
        )

    @torch.no_grad()
    def candidates_from_tokens(
        self,
        image_tokens: torch.Tensor,
        num_candidates: int,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        repetition_penalty: float | None = None,
    ) -> list[list[str]]:
        """The `num_candidates` best beams per image, best first (beam width at least `num_candidates`): the
        hypotheses a reranker chooses from (eval/reranking.py). Candidate 0 is what plain beam search returns."""
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if self.cfg.data.retrieved_captions:
            raise ValueError("candidate captions for reranking are not built for runs with retrieved captions")
        beams = max(num_candidates, num_beams or self.cfg.generate.num_beams)
        batch = image_tokens.shape[0]
        flat = self._caption_batch(image_tokens, batch, max_new_tokens, beams, repetition_penalty, num_candidates)
        return [flat[i : i + num_candidates] for i in range(0, len(flat), num_candidates)]

    def _caption_with_retrieved(self, image_tokens, settings: dict) -> list[str]:
        """SmallCap runs: the first caption of each of the k nearest training images goes into the prompt, as in
        training (data/retrieval_prompt.py); the datastore is the run's training split, built on first use."""
        from ..data.features import FeatureCache
        from ..data.retrieval_prompt import retrieval_messages, training_datastore
        from .language_model import cache_dir

        if image_tokens is None or self.blind:
            raise ValueError("a run with retrieved captions retrieves by image: it cannot caption without one")
        if self.caption_datastore is None:
            self.caption_datastore = training_datastore(self.cfg, FeatureCache(cache_dir() / "features", self.vision))
        retrieved = self.caption_datastore.nearest(image_tokens, self.cfg.data.retrieved_captions)
        return self.chat_from_tokens(image_tokens, [retrieval_messages(r) for r in retrieved], **settings)

    def _generate(
        self,
        image_tokens,
        text: TextBatch,
        end_id: int,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        repetition_penalty: float | None = None,
        visual_first_pad: bool = False,
        num_return_sequences: int = 1,
    ) -> list[str]:
        g = self.cfg.generate
        max_new_tokens = max_new_tokens or g.max_new_tokens
        visual = self.visual_tokens(image_tokens) if image_tokens is not None else None
        embeds, mask, _ = self._embed(visual, text, visual_first_pad=visual_first_pad)
        if self.context_length is not None and embeds.shape[1] + max_new_tokens > self.context_length:
            # what the chat paths fit row by row (fit_prompt); here e.g. a caption with --max-new-tokens too many
            num_visual = 0 if visual is None else visual.shape[1]
            raise PromptTooLong(too_long(embeds.shape[1] - num_visual, num_visual, max_new_tokens, self.context_length))
        was_training = self.training
        self.eval()
        out = self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams or g.num_beams,
            repetition_penalty=repetition_penalty or g.repetition_penalty,
            do_sample=False,
            num_return_sequences=num_return_sequences,
            eos_token_id=end_id,
            pad_token_id=self.specials.pad_id,
        )
        self.train(was_training)
        return [decode_caption(self.tokenizer, row.tolist(), end_id) for row in out]

    @torch.no_grad()
    def caption(self, images, **generate_kwargs) -> list[str]:
        """PIL images or paths -> captions."""
        from ..data.formats import load_image

        images = [load_image(im) if isinstance(im, str | Path) else im for im in images]
        return self.generate_from_tokens(self.encode_images(images), **generate_kwargs)

    # ---- conversations -----------------------------------------------------------------------
    def _conversation_setup(self) -> tuple[str, int]:
        """(format, turn end id) for this run's data.conversation_format, worked out once per setting.

        A fast tokenizer's get_vocab() builds a fresh 49k-entry dict on every call (41 ms for SmolLM2's); done
        for every message, it was a quarter of a vqa training step (cProfile, 40 steps of 4: 24 of 104 s)."""
        setting = self.cfg.data.conversation_format
        if getattr(self, "_conversation_cache", (None,))[0] != setting:
            vocab = self.tokenizer.get_vocab()  # once: the format and its end token both read it
            fmt = resolve_format(setting, vocab)
            token = end_token_for(fmt, self.specials.end_token)
            if token not in vocab:
                raise ValueError(f"conversation format {fmt!r} needs {token!r}, not in the vocabulary")
            self._conversation_cache = (setting, fmt, vocab[token])
        return self._conversation_cache[1:]

    @property
    def conversation_format(self) -> str:
        return self._conversation_setup()[0]

    @property
    def turn_end_id(self) -> int:
        """The token that ends an assistant turn in this run's conversation format."""
        return self._conversation_setup()[1]

    @property
    def context_length(self) -> int | None:
        """The positions the LM reads (visual tokens, prompt and generated tokens together); model/context.py."""
        return context_length(base_causal_lm(self.lm).config)

    def prompt_budget(self, image: bool, new_tokens: int) -> int | None:
        """Text tokens a prompt may have with (or without) the image and `new_tokens` to generate; None: no limit."""
        if self.context_length is None:
            return None
        return self.context_length - (self.num_visual_tokens if image else 0) - new_tokens

    def _fitted(self, conversations, present: list[bool], new_tokens: int, cut_long: bool, with_visual: bool):
        """The generation prompts of a batch, each fitted to the context (fit_prompt: refused, or cut_long: cut).
        with_visual: the batch carries visual tokens (every row's sequence holds their slots)."""
        visual, context = (self.num_visual_tokens if with_visual else 0), self.context_length
        encoded = [self.encode_messages(m, generation=True, image=has) for m, has in zip(conversations, present)]
        return [fit_prompt(e, visual, new_tokens, context, cut_long, row) for row, e in enumerate(encoded)]

    def encode_messages(self, messages: list[dict], generation: bool = False, image: bool = True):
        return encode_conversation(
            self.tokenizer,
            self.conversation_format,
            messages,
            self.turn_end_id,
            max_tokens=None if generation else self.cfg.data.max_conversation_tokens,
            generation=generation,
            image=image,
        )

    def conversation_text_batch(self, conversations: list[list[dict]], images: list[bool] | None = None) -> TextBatch:
        """Training batch of conversations: labels on assistant replies and their end token only."""
        images = images if images is not None else [True] * len(conversations)
        encoded = [self.encode_messages(m, image=has) for m, has in zip(conversations, images)]
        return conversation_batch(encoded, self.specials.pad_id)

    def image_tokens_of(self, images) -> torch.Tensor | None:
        """Paths / PIL images / None (no image) -> image tokens; rows without an image get zeros, which a conversation
        batch masks out (image_present) and a caption batch does not: score those apart (caption_matching)."""
        from ..data.formats import load_image

        if all(im is None for im in images):
            return None
        if self.image_token_memo is not None and all(isinstance(im, str | Path) or im is None for im in images):
            return self._remembered_tokens_of(images)
        loaded = [load_image(im) if isinstance(im, str | Path) else im for im in images]
        present = [im for im in loaded if im is not None]
        tokens = self.encode_images(present)
        out = torch.zeros(len(images), *tokens.shape[1:], dtype=tokens.dtype, device=tokens.device)
        out[[i for i, im in enumerate(loaded) if im is not None]] = tokens
        return out

    def remember_images(self) -> None:
        """From now on each photo (by path) is read and encoded once: an evaluation asks up to 24 questions of
        one photo (POPE: 6 questions x answers and yes/no margins x true and swapped images), and the frozen
        encoder gives the same tokens each time. Each photo is encoded alone, so its tokens do not depend on
        which photos shared its batch."""
        self.image_token_memo = {}

    def _remembered_tokens_of(self, images) -> torch.Tensor:
        from ..data.formats import load_image

        memo = self.image_token_memo
        for path in dict.fromkeys(str(im) for im in images if im is not None and str(im) not in memo):
            memo[path] = self.encode_images([load_image(path)])[0]
        rows = [None if im is None else memo[str(im)] for im in images]
        zeros = torch.zeros_like(next(r for r in rows if r is not None))  # a row without an image: masked out
        return torch.stack([zeros if r is None else r for r in rows])

    @torch.no_grad()
    def chat_batch(self, images, conversations: list[list[dict]], cut_long: bool = False, **generate_kwargs):
        """The next assistant reply for each (image, conversation); an image may be None (no visual tokens).

        A prompt too long for the LM's context raises PromptTooLong (its `row` says which) before the images are
        read; cut_long=True cuts it to fit instead (model/context.py fit_prompt)."""
        present = [im is not None and not self.blind for im in images]
        new_tokens = generate_kwargs.get("max_new_tokens") or self.cfg.generate.max_new_tokens
        encoded = self._fitted(conversations, present, new_tokens, cut_long, any(present))
        image_tokens = None if self.blind else self.image_tokens_of(images)
        return self._chat(image_tokens, encoded, **generate_kwargs)

    @torch.no_grad()
    def chat_from_tokens(
        self,
        image_tokens: torch.Tensor | None,
        conversations: list[list[dict]],
        cut_long: bool = False,
        **generate_kwargs,
    ):
        """chat_batch from cached image tokens [B, N, D] (None: no visual tokens), as evaluation holds them."""
        present = [image_tokens is not None and not self.blind] * len(conversations)
        new_tokens = generate_kwargs.get("max_new_tokens") or self.cfg.generate.max_new_tokens
        encoded = self._fitted(conversations, present, new_tokens, cut_long, any(present))
        return self._chat(None if self.blind else image_tokens, encoded, **generate_kwargs)

    def _chat(self, image_tokens, encoded, **generate_kwargs) -> list[str]:
        text = conversation_batch(encoded, self.specials.pad_id, left_pad=True)
        return self._generate(image_tokens, text, self.turn_end_id, **generate_kwargs)

    @torch.no_grad()
    def reply_logprobs(
        self, images, conversations: list[list[dict]], words: list[list[str]], cut_long: bool = False
    ) -> torch.Tensor:
        """log p(the next reply starts with one of each group of words) for every (image, conversation): [B, G].

        POPE's yes/no as a score instead of a parsed answer ([["yes", "Yes"], ["no", "No"]]): its margin ranks the
        questions, so an AUC says whether the model tells present from absent at all, whatever its threshold.
        Each word counts by its first token; the casings of one answer add up. A prompt too long for the context:
        as chat_batch (refused, or cut_long: cut)."""
        present = [im is not None and not self.blind for im in images]
        encoded = self._fitted(conversations, present, 0, cut_long, any(present))
        image_tokens = None if self.blind else self.image_tokens_of(images)
        text = conversation_batch(encoded, self.specials.pad_id, left_pad=True)
        visual = self.visual_tokens(image_tokens) if image_tokens is not None else None
        embeds, mask, _ = self._embed(visual, text)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: each row's positions start at its first token
        base = base_causal_lm(self.lm)
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        logprobs = torch.log_softmax(base.get_output_embeddings()(hidden.last_hidden_state[:, -1]).float(), dim=-1)
        first = [
            sorted({self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in group}) for group in words
        ]
        return torch.stack([torch.logsumexp(logprobs[:, ids], dim=-1) for ids in first], dim=-1).cpu()

    def chat(self, image, messages: list[dict], **generate_kwargs) -> str:
        """One image (path, PIL image or None) and a conversation ending in a user turn -> the assistant's reply."""
        return self.chat_batch([image], [messages], **generate_kwargs)[0]

    def loglikelihood(
        self, image, messages: list[dict], continuation: str, cut_long: bool = False
    ) -> tuple[float, bool]:
        """log p(continuation | image, conversation) as the start of the next assistant reply, and whether greedy
        decoding would write exactly it (lmms-eval's `loglikelihood`)."""
        total, _, greedy = self.continuation_logprobs(image, messages, [continuation], cut_long)[0]
        return total, greedy

    @torch.no_grad()
    def continuation_logprobs(
        self, image, messages: list[dict], continuations: list[str], cut_long: bool = False, ended: bool = False
    ) -> list[tuple[float, int, bool]]:
        """For each continuation: log p(it | image, conversation) as the start of the next assistant reply, its
        token count, and whether greedy decoding would write exactly it. All in one forward pass (the options of
        a multiple-choice question share the image and the prompt); an empty one scores (0.0, 0, True). A prompt
        too long for the context with the longest continuation: PromptTooLong, or (cut_long) its middle cut, as
        chat_batch does. ended: each continuation as the whole reply, its turn's end token scored after it (so
        that "1" is not likelier than "10" merely by being its start)."""
        has_image = image is not None and not self.blind
        prompt = self.encode_messages(messages, generation=True, image=has_image)
        conts = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        conts = [c + [self.turn_end_id] if ended and c else c for c in conts]
        out = [(0.0, 0, True)] * len(conts)
        scored = [i for i, c in enumerate(conts) if c]
        if not scored:
            return out
        visual = self.num_visual_tokens if has_image else 0
        longest = max(len(conts[i]) for i in scored)
        prompt = fit_prompt(prompt, visual, longest, self.context_length, cut=cut_long)
        rows = [
            type(prompt)(prompt.ids + conts[i], [IGNORE_INDEX] * len(prompt.ids) + conts[i], prompt.image_position)
            for i in scored
        ]
        text = conversation_batch(rows, self.specials.pad_id)  # right-padded: each row's positions start at 0
        image_tokens = self.image_tokens_of([image] * len(rows)) if has_image else None
        visual = self.visual_tokens(image_tokens) if image_tokens is not None else None
        embeds, mask, labels = self._embed(visual, text)
        base = base_causal_lm(self.lm)
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[supervised]).float()  # only the continuations' positions
        target = targets[supervised]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
        greedy = logits.argmax(dim=-1) == target
        counts = supervised.sum(dim=1).tolist()
        for i, lp, g, n in zip(scored, token_logprobs.split(counts), greedy.split(counts), counts):
            out[i] = (lp.sum().item(), n, bool(g.all()))
        return out

    # ---- what is trained, what is saved ---------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the connector (also when frozen: its random init is part of the run), LoRA,
        and the encoder blocks that train (vision.unfreeze_last)."""
        connector = {} if self.blind else self.connector.state_dict()
        state = {f"connector.{k}": v for k, v in connector.items()}
        for name, p in self.vision.tuned_named_parameters():
            state[f"vision.{name}"] = p.detach()
        for name, p in self.lm.named_parameters():
            if "lora_" in name:
                state[f"lm.{name}"] = p.detach()
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"checkpoint does not match this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        if not self.blind:
            self.connector.load_state_dict(
                {k[len("connector.") :]: v for k, v in state.items() if k.startswith("connector.")}
            )
        params = {f"lm.{n}": p for n, p in self.lm.named_parameters()}
        params |= {f"vision.{n}": p for n, p in self.vision.named_parameters()}
        with torch.no_grad():
            for k, v in state.items():
                if not k.startswith("connector."):
                    params[k].copy_(v)

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(module, total, trainable) for the vision encoder, connector, LLM base weights and LoRA."""
        rows = []
        for name, module in (("vision encoder", self.vision), ("connector", self.connector)):
            ps = [] if module is None else list(module.parameters())
            rows.append((name, sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))
        base = [(n, p) for n, p in self.lm.named_parameters() if "lora_" not in n]
        lora = [(n, p) for n, p in self.lm.named_parameters() if "lora_" in n]
        for name, ps in (("language model", base), ("LoRA adapters", lora)):
            rows.append((name, sum(p.numel() for _, p in ps), sum(p.numel() for _, p in ps if p.requires_grad)))
        return rows

    @property
    def num_visual_tokens(self) -> int:
        return 0 if self.blind else self.connector.num_visual_tokens

    def model_info(self) -> dict:
        """Totals of the parameter table and the visual tokens per image: what a run records in model_info.json."""
        table = self.parameter_table()
        return {
            "total_params": sum(t for _, t, _ in table),
            "trainable_params": sum(t for _, _, t in table),
            "visual_tokens": self.num_visual_tokens,
        }


def build_vlm(cfg: Config) -> VLM:
    """Builds the whole model from a config; the trainable parts start from a seeded initialisation."""
    vision = build_vision_encoder(cfg.vision.name, cfg.vision.image_size)
    if cfg.vision.unfreeze_last:
        vision.unfreeze_last(cfg.vision.unfreeze_last)
    lm, tokenizer = load_language_model(cfg.lm.name)
    torch.manual_seed(cfg.train.seed)
    lm_dim = base_causal_lm(lm).get_input_embeddings().embedding_dim
    num_image_tokens = vision.grid_size[0] * vision.grid_size[1]
    layers = decoder_layers(base_causal_lm(lm).get_decoder())
    connector = build_connector(
        cfg.connector, vision.out_dim, num_image_tokens, lm_dim, embedding_rms(lm), vision.grid_size, len(layers)
    )
    if connector is not None and cfg.connector.freeze:
        connector.requires_grad_(False)
    if hasattr(connector, "install"):  # xattn: its blocks go in before the LLM's layers (model/xattn.py)
        connector.install(layers)
    lora = cfg.lm.lora
    if lora.enabled:
        lm = add_lora(lm, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return VLM(cfg, vision, connector, lm, tokenizer)


def format_parameter_table(rows: list[tuple[str, int, int]]) -> str:
    total_all = sum(r[1] for r in rows)
    lines = [f"{'module':<16} {'total':>13} {'trainable':>13} {'share of all':>13}"]
    for name, total, trainable in rows:
        lines.append(f"{name:<16} {total:>13,} {trainable:>13,} {trainable / max(total_all, 1):>12.3%}")
    trainable_all = sum(r[2] for r in rows)
    lines.append(f"{'all':<16} {total_all:>13,} {trainable_all:>13,} {trainable_all / max(total_all, 1):>12.3%}")
    return "\n".join(lines)
