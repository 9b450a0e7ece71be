"""lmms-eval task functions for vlmlab's task files: the prompts and scorers are vlmlab's own.

lmms-eval 0.7.3's POPE computes the yes-ratio from the labels (0.5 by construction) and compares the raw
prediction with "yes", so "Yes." counts as wrong; its mmbench falls back to a web judge and, offline, to a
random letter. These tasks use vlmlab's scorers instead: POPE answers parsed as the POPE authors parse them
and the yes-ratio of the predictions; multiple choice by static extraction with CircularEval; captions with
vlmlab's caption metrics (pycocoevalcap CIDEr-D, PTB tokenizer when Java is present), as `vlmlab eval` does.
"""

from vlmlab.data.questions import Question
from vlmlab.eval.multiple_choice import choice_scores, extract_choice
from vlmlab.eval.pope import pope_scores
from vlmlab.eval.question_scores import question_text
from vlmlab.eval.vqa import vqa_scores


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


def mc_likelihood_keep(doc, results):
    """Each option's loss (the plugin returns -log p summed): the picks by the summed score and per character."""
    losses = [_loss(r) for r in results]
    per_char = [loss / max(len(o), 1) for loss, o in zip(losses, doc["options"])]
    picks = {"sum": losses.index(min(losses)), "char": per_char.index(min(per_char))}
    return {name: {"doc": doc, "picks": picks} for name in _METRICS[doc["task_kind"]]}


def mc_likelihood_metric(name, norm):
    def aggregate(items):
        docs = [i["doc"] for i in items]
        picks = [i["picks"][norm] for i in items]
        return choice_scores(picks, [d["answer_index"] for d in docs], [d["group"] for d in docs])[name]

    return aggregate


def keep(doc, results):
    """Every metric receives the document and the reply; the aggregations score them all at once."""
    return {name: {"doc": doc, "reply": results[0]} for name in _METRICS[doc["task_kind"]]}


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

_METRICS = {
    "caption": ["caption_cider_d", "caption_bleu_4"],
    "pope": ["pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"],
    "vqa": ["vqa_accuracy"],
    "mmbench": ["mc_accuracy", "mc_circular_accuracy"],
    "mmbench_likelihood": ["mc_likelihood_accuracy", "mc_likelihood_circular_accuracy", "mc_likelihood_sum_accuracy"],
}
