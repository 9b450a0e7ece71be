"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) via pycocoevalcap, the COCO reference code.

The scores come from the library itself so they stay comparable to published numbers. The COCO
pipeline needs Java twice: the Stanford PTB tokenizer and METEOR. Without Java we fall back to a
plain regex tokenizer, skip METEOR, and say so in the result ('tokenizer': 'plain'), because
plain-tokenized scores are close to, but not exactly, the official ones.
"""

from __future__ import annotations

import re
import shutil
import threading
import warnings

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits (any script); everything else separates


def plain_tokenize(text: str) -> str:
    """Lower-case, drop punctuation, single-space join: a Java-free stand-in for the PTB tokenizer."""
    return " ".join(_WORD.findall(text.lower()))


def _check(references: dict, candidates: dict) -> None:
    """Fail loudly on mismatched ids: pycocoevalcap would only raise a bare AssertionError."""
    missing = sorted(map(str, references.keys() - candidates.keys()))
    extra = sorted(map(str, candidates.keys() - references.keys()))
    if missing or extra:
        raise ValueError(
            f"candidates and references differ: no candidate for ids {missing}, no references for ids {extra}"
        )
    empty = sorted(str(k) for k, refs in references.items() if len(refs) == 0)
    if empty:
        raise ValueError(f"empty reference list for ids {empty}")
    if not references:
        raise ValueError("no captions to score")


def _ptb_tokenize(references: dict, candidates: dict) -> tuple[dict, dict]:
    """Tokenize both sides in one PTB call (one JVM start instead of two)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # tag ids so references and candidates of the same image stay apart in one batch
    batch = {("ref", k): [{"caption": c} for c in refs] for k, refs in references.items()}
    batch |= {("cand", k): [{"caption": c}] for k, c in candidates.items()}
    out = PTBTokenizer().tokenize(batch)
    gts = {k: out[("ref", k)] for k in references}
    res = {k: out[("cand", k)] for k in candidates}
    return gts, res


def _meteor(gts: dict, res: dict) -> float:
    """METEOR runs a long-lived java process; always shut it down so callers (and tests) don't hang."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    finally:
        proc = meteor.meteor_p
        proc.stdin.close()
        proc.kill()
        proc.wait()
        # Meteor.__del__ takes the lock again; a fresh one means it cannot block if compute_score
        # died while holding it (its own cleanup is then a harmless no-op on a dead process)
        meteor.lock = threading.Lock()


def _tokenized(references: dict, candidates: dict, use_java: bool | None) -> tuple[dict, dict, bool]:
    """Both sides tokenized as the COCO pipeline does (PTB, with Java), else by plain_tokenize (with a warning)."""
    _check(references, candidates)
    if use_java is None:
        use_java = shutil.which("java") is not None
    if use_java:
        return *_ptb_tokenize(references, candidates), True
    warnings.warn(
        "Java not used: METEOR is skipped and a plain regex tokenizer replaces PTB "
        "(scores are close to, not exactly, the official COCO ones)",
        stacklevel=3,
    )
    gts = {k: [plain_tokenize(c) for c in refs] for k, refs in references.items()}
    res = {k: [plain_tokenize(c)] for k, c in candidates.items()}
    return gts, res, False


def cider_per_image(
    references: dict[str, list[str]], candidates: dict[str, str], use_java: bool | None = None
) -> dict[str, float]:
    """Each image's CIDEr-D, document frequencies from all the references given (so their mean is the corpus
    CIDEr-D that caption_metrics reports for the same captions): what a paired comparison of two runs needs."""
    gts, res, _ = _tokenized(references, candidates, use_java)
    _, scores = Cider().compute_score(gts, res)
    return {k: float(v) for k, v in zip(gts, scores)}


def caption_metrics(
    references: dict[str, list[str]], candidates: dict[str, str], use_java: bool | None = None, meteor: bool = True
) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (pycocoevalcap's Cider is CIDEr-D) over images keyed by id.

    use_java: None auto-detects `java` on PATH; True forces the PTB tokenizer + METEOR; False forces
    the plain tokenizer and no METEOR (e.g. for cheap extra scores, or in tests).
    meteor: False skips METEOR (about 10 s of JVM start-up) when only the other scores are wanted.
    CIDEr-D weights n-grams by document frequency across images, so it needs several images to mean
    anything (with one image every idf, and so the score, is 0).
    """
    gts, res, use_java = _tokenized(references, candidates, use_java)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    out["METEOR"] = _meteor(gts, res) if use_java and meteor else None
    out["ROUGE-L"] = float(rouge)
    out["CIDEr-D"] = float(cider)
    out["tokenizer"] = "ptb" if use_java else "plain"
    out["java"] = bool(use_java)
    return out
