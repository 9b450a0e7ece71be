"""A vlmlab run as an lmms-eval model: generate_until, loglikelihood and generate_until_multi_round.

The prompt is exactly what `vlmlab eval questions` asks (`<image>` + the task's text, as one user turn in the run's
chat format) and generation is greedy with the same token budget, so both give the same answers. An empty
context asks for a caption: the run's own caption prompt and generate settings, as `vlmlab eval captions`.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm


class VlmlabLMM(lmms):
    is_simple = True

    def __init__(self, run: str, batch_size: int | str = 16, max_new_tokens: int | str = 10, **kwargs) -> None:
        super().__init__()
        from ...run import load_run

        if kwargs:
            raise ValueError(
                f"vlmlab model: unknown --model_args {sorted(kwargs)}; allowed: run, batch_size, max_new_tokens"
            )
        self.model = load_run(run)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def _visual(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if len(visuals) > 1:
            raise ValueError(f"{task} doc {doc_id}: {len(visuals)} images; a vlmlab model reads one")
        return visuals[0] if visuals else None

    @staticmethod
    def _messages(context: str, image) -> list[dict]:
        return [{"role": "user", "content": ("<image>\n" if image is not None else "") + context}]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="vlmlab generate", disable=len(requests) < 2):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            images = [self._visual(v, d, t, s) for _, _, v, d, t, s in chunk]
            max_new = {int(g.get("max_new_tokens", self.max_new_tokens)) for _, g, *_ in chunk}
            replies: list[str | None] = [None] * len(chunk)
            captions = [i for i, (context, *_) in enumerate(chunk) if not context.strip()]
            if any(images[i] is None for i in captions):
                raise ValueError("a caption request (empty context) needs an image")
            for i, caption in zip(captions, self.model.caption([images[i] for i in captions]) if captions else []):
                replies[i] = caption
            asks = [i for i in range(len(chunk)) if replies[i] is None]
            if asks:
                convs = [self._messages(chunk[i][0], images[i]) for i in asks]
                answers = self.model.chat_batch([images[i] for i in asks], convs, max_new_tokens=min(max_new))
                for i, answer in zip(asks, answers):
                    replies[i] = answer
            out += replies
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(the continuation's loss: -log p summed over its tokens, whether greedy decoding writes it) per request.

        A loss, not a log-likelihood, because lmms-eval reads it as one: its `multiple_choice` tasks pick the
        option with the smallest value (lmms_eval/api/task.py, process_results: "we return the actual loss in many
        model loglikelihood / we just use the argmin here"; its llava model returns `loss.item()`). A
        log-likelihood here would make them pick the least likely option. A prompt too long for the context is cut
        to fit, as `vlmlab eval questions` asks it."""
        out = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = self._visual(doc_to_visual, doc_id, task, split)
            logprob, greedy = self.model.loglikelihood(
                image, self._messages(context, image), continuation, cut_long=True
            )
            out.append((-logprob, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """lmms-eval's multi-round tasks pass one context per round; each is answered as a single turn."""
        return self.generate_until(requests)
