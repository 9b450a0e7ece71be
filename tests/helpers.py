"""Plain helper functions shared by several test modules (fixtures are in conftest.py)."""

import json
import struct
import zlib
from pathlib import Path

from vlmlab.model.sequence import IGNORE_INDEX


def png_header_only(path, width, height):
    """A PNG whose header claims width x height: what a decompression bomb looks like before decoding."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def supervised_text(tokenizer, enc):
    """The text of the tokens an encoded conversation trains on (label not ignored)."""
    return tokenizer.decode([t for t, lab in zip(enc.ids, enc.labels) if lab != IGNORE_INDEX])


# /proc/cpuinfo as Linux writes it on three CPUs: with AVX512-BF16, with AVX-512 but no bf16, aarch64 with BF16
EPYC_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16
"""
XEON_NO_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve bf16 i8mm
CPU implementer\t: 0x41
"""


def tiny_chain_file(root, clip_dir, gpt2_dir, overrides=None, steps=2, **keys):
    """A chain YAML under root on the tiny CLIP + GPT-2 and a 40-image synthetic world (caption -> vqa, blind twin,
    POPE by default); `overrides` and `keys` replace the defaults. Returns its path as a string."""
    import yaml

    chain = {
        "name": "tiny",
        "base": None,
        "overrides": {
            "vision.name": f"hf:{clip_dir}",
            "lm.name": str(gpt2_dir),
            "data.datasets": [f"synthetic:{root / 'world'}"],
            "data.synthetic_images": 40,
            "train.batch_size": 4,
            "train.eval_every": steps,
            "train.save_every": steps,
            "train.max_steps": steps,
            "connector.num_queries": 4,
            **(overrides or {}),
        },
        "tasks": str(root / "tasks"),
        "stages": {"caption": {}, "vqa": {}},
        "blind": True,
        "evaluate": ["pope"],
        **keys,
    }
    (root / "chain.yaml").write_text(yaml.safe_dump(chain))
    return str(root / "chain.yaml")


def write_vqa_training_files(folder: Path, rows: list[tuple[str, str, list[str]]]) -> None:
    """VQA-v2 vqa_train_questions.json + vqa_train_annotations.json in `folder`: (question id, question type,
    human answers) per row, what make-tasks writes for a run's stage-3 training questions."""
    questions = [{"question_id": qid, "image_id": 1, "question": "?"} for qid, _, _ in rows]
    annotations = [
        {"question_id": qid, "image_id": 1, "question_type": kind, "answer_type": "other",
         "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)],
         "multiple_choice_answer": answers[0]}
        for qid, kind, answers in rows
    ]  # fmt: skip
    (folder / "vqa_train_questions.json").write_text(json.dumps({"questions": questions}))
    (folder / "vqa_train_annotations.json").write_text(json.dumps({"annotations": annotations}))
