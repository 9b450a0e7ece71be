"""lmms-eval task functions for vlmlab's task files: the prompts and scorers are vlmlab's own.

lmms-eval 0.7.3's POPE computes the yes-ratio from the labels (0.5 by construction) and compares the raw
prediction with "yes", so "Yes." counts as wrong; its mmbench falls back to a web judge and, offline, to a
random letter. These tasks use vlmlab's scorers instead: POPE answers parsed as the POPE authors parse them
and the yes-ratio of the predictions; multiple choice by static extraction with CircularEval; captions with
vlmlab's caption metrics (pycocoevalcap CIDEr-D, PTB tokenizer when Java is present), as `vlmlab eval` does.
"""

from lmms_eval.api.instance import Instance
from lmms_eval.api.task import ConfigurableTask

from vlmlab.data.questions import Question
from vlmlab.eval.multiple_choice import choice_scores, extract_choice
from vlmlab.eval.pope import pope_scores
from vlmlab.eval.question_scores import question_text
from vlmlab.eval.vqa import vqa_scores
from vlmlab.integrations.lmms_eval.task_yamls import METRICS


def _question(doc) -> Question:
    return Question(
        str(doc["question_id"]),
        doc["image"],
        doc["question"],
        answers=list(doc.get("answers") or []),
        answer_type=doc.get("answer_type", ""),
        question_type=doc.get("question_type", ""),
        choices=list(doc.get("options") or []),
        answer_index=doc.get("answer_index"),
        hint=doc.get("hint", ""),
        group=str(doc.get("group", "")),
    )


def doc_to_visual(doc):
    from vlmlab.data.formats import load_image

    return [load_image(doc["image"])]


def vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return question_text("vqa", _question(doc))


def caption_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """An empty prompt: the vlmlab model then writes the run's own caption (its prompt and generate settings)."""
    return ""


def mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return question_text("mmbench", _question(doc))


def mc_doc_to_choice(doc):
    return list(doc["options"])


def mc_doc_to_target(doc):
    return int(doc["answer_index"])


def _loss(result) -> float:
    """One option's (loss, greedy) as lmms-eval hands it to process_results. lmms-eval 0.7.3 turns every model output
    that is not text into its str() (api/instance.py, unwrap_generation_output: `return str(output), None`), so
    its own multiple_choice scoring fails on any model ("too many values to unpack", api/task.py); read it back."""
    import ast

    value = ast.literal_eval(result) if isinstance(result, str) else result
    return float(value[0])


def no_visual(doc):
    return []


class MutualInfoChoiceTask(ConfigurableTask):
    """lmms-eval's `multiple_choice` task plus, per option, its log-likelihood as the reply to an empty message with
    no image: the baseline that mutual-information scoring subtracts (as `vlmlab eval questions` scores it).

    Written here because lmms-eval's own way cannot run: a metric named `acc_mutual_info` makes construct_requests
    add unconditional requests of two arguments, `("", option)`, and build_requests then reads `arguments[2]` of
    every request (its doc_to_visual cache fix, api/task.py) and fails with "tuple index out of range", for any
    model (lmms-eval 0.7.3, and its main branch of 2026-08). These requests carry all six arguments, an image
    function that gives none, and idx after the options' so that each document's results come back as the
    options' then the baselines' (the evaluator sorts a document's requests by idx)."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def construct_requests(self, doc_id, ctx, **kwargs):
        requests = super().construct_requests(doc_id, ctx, **kwargs)
        split = kwargs["metadata"]["split"]
        options = self.doc_to_choice(self.dataset[split][doc_id])
        return requests + [
            Instance(
                request_type="loglikelihood",
                arguments=("", option, no_visual, doc_id, self.config.task, split),
                idx=len(options) + i,
                task_name=self.config.task,
                doc_id=doc_id,
                **kwargs,
            )
            for i, option in enumerate(options)
        ]


def mc_likelihood_keep(doc, results):
    """Each option's loss (the plugin returns -log p summed), then each option's with no context and no image
    (MutualInfoChoiceTask): the picks by the summed score, per character and by mutual information."""
    options = doc["options"]
    losses = [_loss(r) for r in results]
    if len(losses) != 2 * len(options):
        raise ValueError(f"doc {doc['question_id']}: {len(losses)} results for {len(options)} options and baselines")
    losses, unconditional = losses[: len(options)], losses[len(options) :]
    per_char = [loss / max(len(o), 1) for loss, o in zip(losses, options)]
    mutual_info = [u - c for c, u in zip(losses, unconditional)]  # log p(o | image, question) - log p(o)
    picks = {
        "sum": losses.index(min(losses)),
        "char": per_char.index(min(per_char)),
        "mutual_info": mutual_info.index(max(mutual_info)),
    }
    return {name: {"doc": doc, "picks": picks} for name in METRICS[doc["task_kind"]]}


def mc_likelihood_metric(name, norm):
    def aggregate(items):
        docs = [i["doc"] for i in items]
        picks = [i["picks"][norm] for i in items]
        return choice_scores(picks, [d["answer_index"] for d in docs], [d["group"] for d in docs])[name]

    return aggregate


def keep(doc, results):
    """Every metric receives the document and the reply; the aggregations score them all at once."""
    return {name: {"doc": doc, "reply": results[0]} for name in METRICS[doc["task_kind"]]}


def _split(items):
    return [i["doc"] for i in items], [i["reply"] for i in items]


def pope_metric(name):
    def aggregate(items):
        docs, replies = _split(items)
        return pope_scores(replies, [d["answers"][0] for d in docs])[name]

    return aggregate


def vqa_accuracy(items):
    docs, replies = _split(items)
    return vqa_scores(replies, [d["answers"] for d in docs])["vqa_accuracy"]


def mc_metric(name):
    def aggregate(items):
        docs, replies = _split(items)
        picks = [extract_choice(r, d["options"]) for r, d in zip(replies, docs)]
        return choice_scores(picks, [d["answer_index"] for d in docs], [d["group"] for d in docs])[name]

    return aggregate


def caption_metric(name):
    def aggregate(items):
        from vlmlab.eval.metrics import caption_metrics

        docs, replies = _split(items)
        refs = {str(i): d["answers"] for i, d in enumerate(docs)}
        cands = {str(i): r for i, r in enumerate(replies)}
        return caption_metrics(refs, cands, meteor=False)[name]

    return aggregate


caption_cider_d, caption_bleu_4 = caption_metric("CIDEr-D"), caption_metric("BLEU-4")
pope_accuracy, pope_precision, pope_recall = pope_metric("accuracy"), pope_metric("precision"), pope_metric("recall")
pope_f1, pope_yes_ratio = pope_metric("f1"), pope_metric("yes_ratio")
mc_accuracy, mc_circular_accuracy = mc_metric("accuracy"), mc_metric("circular_accuracy")
mc_likelihood_accuracy = mc_likelihood_metric("accuracy", "char")
mc_likelihood_circular_accuracy = mc_likelihood_metric("circular_accuracy", "char")
mc_likelihood_sum_accuracy = mc_likelihood_metric("accuracy", "sum")
mc_likelihood_mutual_info_accuracy = mc_likelihood_metric("accuracy", "mutual_info")
mc_likelihood_circular_mutual_info_accuracy = mc_likelihood_metric("circular_accuracy", "mutual_info")
