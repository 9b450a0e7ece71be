"""`vlmlab report RUNS_DIR`: one self-contained HTML page (images inline) from an ablation suite's folder.

It explains the model's parts, then shows the results table, the plots, and per variant a contact sheet
(test images with references and captions) and, for Q-Former variants, where each query looks.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from ..config import write_atomic
from ..data.synthetic import caption_attributes
from .ablate import STAGE1_METRICS, _mean_std, metric_cells, metrics_present, stage1_rows

PARTS = [
    (
        "vision encoder (frozen)",
        "turns the picture into a grid of image tokens ({encoder}). It never changes; its outputs are cached.",
    ),
    (
        "connector (trainable)",
        "turns image tokens into a few visual tokens, vectors the LLM reads as if they were "
        "words. The Q-Former does it with learnable queries that attend to the image grid; meanpool averages the grid "
        "first (no spatial detail); linear/mlp map every image token on its own (LLaVA: many visual tokens).",
    ),
    (
        "language model (frozen) + LoRA (trainable)",
        "reads [visual tokens][prompt] and writes the caption. LoRA adds "
        "small low-rank updates to its attention so it learns to use the visual tokens; without LoRA only the "
        "connector can adapt.",
    ),
]
SWITCH_MEANING = {
    "connector.type": "which connector makes the visual tokens",
    "connector.num_queries": "how many visual tokens the Q-Former makes (its capacity)",
    "connector.freeze": "connector left at its random initialisation: the image still flows in, but unlearned",
    "lm.lora.enabled": "whether the LLM may adapt at all (false: only the connector learns)",
    "connector.depth": "Q-Former layers",
}
METRIC_MEANING = {
    "CIDEr-D": "agreement with the human (or generated) references; higher is better",
    "BLEU-4": "4-gram overlap with the references; higher is better",
    "NLL true": "caption negative log-likelihood per token with the true image; lower is better",
    "visual gain": "NLL with another image minus NLL with the true one: nats per token the image is worth",
    "changed by swap": "share of captions that change when the image is swapped for another",
    "attn entropy": "Q-Former: mean entropy of the last layer's cross-attention over the image grid (nats); "
    "lower = more selective",
    "attn uniform": "the entropy of uniform attention over the grid: the value of a Q-Former that looks everywhere",
    "attn max weight": "Q-Former: mean largest attention weight of a query; uniform is 1 / grid cells",
    "query corr": "Q-Former: mean correlation between the queries' attention maps; 1 = all queries look alike",
    "attn on objects": "Q-Former: mean share of a query's attention on the grid cells that hold an object",
    "objects read": "Q-Former, scenes with 2+ objects: share of the objects that are some query's favourite "
    "(1 / objects when every query reads the same one)",
    "objects read if alike": "what 'objects read' is when every query reads the same object (mean of 1 / objects)",
    "objects exact": "share of the scene's objects the caption describes with colour, shape, size and place all right",
    "objects real": "share of the caption's objects that are in the scene, every attribute right",
    "colour-shape pairs": "share of the scene's objects whose colour the caption binds to the right shape",
}


def _img(path: Path, alt: str, width: str = "100%", max_png_bytes: int = 400_000) -> str:
    """Inlines an image; large ones (photo contact sheets, attention maps) as JPEG so the page stays a few MB."""
    raw, kind = path.read_bytes(), "png"
    if len(raw) > max_png_bytes:
        from PIL import Image

        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=85)
        raw, kind = buffer.getvalue(), "jpeg"
    data = base64.b64encode(raw).decode()
    return f'<img src="data:image/{kind};base64,{data}" alt="{html.escape(alt)}" style="max-width:{width}">'


def build_report(runs_dir: str | Path, out: str | Path | None = None, inspect_images: int = 2) -> Path:
    """Writes RUNS_DIR/report.html; returns its path. Draws missing attention maps (Q-Former variants)."""
    runs_dir = Path(runs_dir)
    if not (runs_dir / "results.csv").exists():
        raise FileNotFoundError(f"{runs_dir} has no results.csv: run `vlmlab ablate SUITE --out-dir {runs_dir}` first")
    rows = list(csv.DictReader(open(runs_dir / "results.csv")))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    suite = {}
    if (runs_dir / "suite.json").exists():
        suite = json.loads((runs_dir / "suite.json").read_text())
    title = f"vlmlab ablation report: {suite.get('name', runs_dir.name)}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    encoder = _encoder_summary(runs_dir / variants[0])  # builds the encoder once to read its grid
    parts.append(
        "<h2>What the model is made of</h2><ol>"
        + "".join(
            f"<li><b>{html.escape(name)}</b>: {html.escape(text.format(encoder=encoder))}</li>" for name, text in PARTS
        )
        + "</ol>"
    )
    parts.append(
        "<h2>The variants</h2><p>Each variant changes only the settings shown; everything else "
        "(data, steps, seed list, decoding) is the same.</p><table><tr><th>variant</th><th>settings</th>"
        "<th>what it tests</th></tr>"
    )
    for v in variants:
        if v not in suite.get("variants", {}):
            parts.append(
                f"<tr><td>{html.escape(v)}</td><td colspan=2>settings unknown: {html.escape(str(runs_dir))} "
                "has no suite.json (written by `vlmlab ablate`)</td></tr>"
            )
            continue
        settings = suite["variants"][v] or {}
        shown = ", ".join(f"{k}: {val}" for k, val in settings.items()) or "(the reference)"
        meaning = (
            suite.get("descriptions", {}).get(v)
            or "; ".join(SWITCH_MEANING.get(k, k) for k in settings)
            or "the reference model"
        )
        parts.append(
            f"<tr><td>{html.escape(v)}</td><td><code>{html.escape(shown)}</code></td><td>{html.escape(meaning)}</td></tr>"
        )
    parts.append("</table>")

    metrics = metrics_present(rows)
    seeds = sorted({r["seed"] for r in rows})
    parts.append(
        f"<h2>Results: {html.escape(suite.get('split', 'test'))} split, mean &plusmn; std over seeds "
        f"{', '.join(seeds)}</h2><table class='results'><tr><th>variant</th><th>runs</th><th>trainable params</th>"
        "<th>visual tokens</th>"
        + "".join(f"<th title='{html.escape(METRIC_MEANING.get(n, ''))}'>{html.escape(n)}</th>" for n, _, _ in metrics)
        + "</tr>"
    )
    for v in variants:
        vr = [r for r in rows if r["variant"] == v]
        cells = metric_cells(vr, metrics, " &plusmn; ")
        params = vr[0].get("trainable_params") or "n/a"
        params = f"{int(params):,}" if params.isdigit() else params
        parts.append(
            f"<tr><td>{html.escape(v)}</td><td>{len(vr)}</td><td>{params}</td><td>{vr[0].get('visual_tokens', '')}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    parts.append(
        "</table><ul>"
        + "".join(f"<li><b>{html.escape(n)}</b>: {html.escape(t)}</li>" for n, t in _metric_legend(metrics))
        + "</ul>"
    )

    parts.extend(_readout(rows, variants, suite.get("variants", {}), metrics))
    parts.extend(_stage1_section(runs_dir, variants, seeds))

    parts.append("<h2>Plots</h2><div class='grid'>")
    for _, key, _ in metrics:
        png = runs_dir / f"bar_{key.replace('-', '_')}.png"
        if png.exists():
            parts.append(_img(png, f"bar chart of {key}"))
    parts.append("</div>")
    if (runs_dir / "val_loss.png").exists():
        parts.append(
            "<h3>Validation loss during training</h3>"
            + _img(runs_dir / "val_loss.png", "validation loss curves", "760px")
        )

    parts.append("<h2>Per variant: captions and what the queries look at</h2>")
    for v in variants:
        run = runs_dir / v / f"seed{sorted(int(s) for s in seeds)[0]}"
        parts.append(f"<h3 id='{html.escape(v)}'>{html.escape(v)}</h3>")
        if (run / "contact_sheet.png").exists():
            parts.append(
                "<p>Test images: a reference caption (grey), the model's caption (bold), and its caption "
                "when given another image.</p>" + _img(run / "contact_sheet.png", f"contact sheet {v}")
            )
        for png in _attention_maps(run, inspect_images):
            parts.append(
                "<p>Each panel: one query's cross-attention over the image grid (bright = attended), titled "
                "with the vocabulary tokens nearest to the visual token it becomes.</p>" + _img(png, f"attention {v}")
            )
    parts.append(
        "<h2>Reproduce</h2><pre>vlmlab ablate SUITE --out-dir "
        + html.escape(str(runs_dir))
        + "\nvlmlab report "
        + html.escape(str(runs_dir))
        + "</pre>"
    )

    page = HTML_PAGE.format(title=html.escape(title), body="\n".join(parts))
    out = Path(out or runs_dir / "report.html")
    write_atomic(out, page)
    return out


def _readout(rows: list[dict], variants: list[str], settings: dict, metrics) -> list[str]:
    """Each variant minus the reference, per metric, marked better / worse, and greyed where within seed noise."""
    reference = next((v for v in variants if not settings.get(v)), variants[0])
    values = {
        v: {
            key: [float(r[key]) for r in rows if r["variant"] == v and r.get(key) not in (None, "")]
            for _, key, _ in metrics
        }
        for v in variants
    }
    out = [
        f"<h2>Read-out: each switch against the reference ({html.escape(reference)})</h2><p>Each cell is the "
        "variant's mean minus the reference's mean. <span class='better'>Green</span>: better, "
        "<span class='worse'>red</span>: worse. A grey cell is a difference no larger than the two seed standard "
        "deviations added together (noise); with one seed there is no noise estimate, so judge small "
        "differences with care.</p><table><tr><th>variant</th>"
    ]
    out.append("".join(f"<th>{html.escape(n)}</th>" for n, _, _ in metrics) + "</tr>")
    for v in variants:
        if v == reference:
            continue
        cells = []
        for _, key, higher_is_better in metrics:
            mine, ref = values[v][key], values[reference][key]
            if not mine or not ref:
                cells.append("<td>n/a</td>")
                continue
            (mean, std), (ref_mean, ref_std) = _mean_std(mine), _mean_std(ref)
            delta = mean - ref_mean
            noise = len(mine) > 1 and len(ref) > 1 and abs(delta) <= std + ref_std
            kind = "noise" if noise or delta == 0 else ("better" if (delta > 0) == higher_is_better else "worse")
            cells.append(f"<td class='{kind}'>{delta:+.3f}</td>")
        out.append(f"<tr><td>{html.escape(v)}</td>{''.join(cells)}</tr>")
    return out + ["</table>"]


def _encoder_summary(run_dir: Path) -> str:
    """'efficientnet-lite0: 7x7 = 49 vectors of 1280 numbers', read from the suite's own first run."""
    from ..config import load_config
    from ..model.vision import build_vision_encoder

    config = next(run_dir.glob("seed*/config.yaml"), None)
    if config is None:
        return "encoder unknown: no run config found"
    cfg = load_config(config)
    try:
        encoder = build_vision_encoder(cfg.vision.name, cfg.vision.image_size)
    except (OSError, ValueError) as error:  # e.g. a hub encoder on a machine that is offline
        return f"{cfg.vision.name}; its grid could not be read here: {error}"
    if encoder.grid_size is None:
        return f"{cfg.vision.name}: vectors of {encoder.out_dim} numbers"
    h, w = encoder.grid_size
    return f"{cfg.vision.name}: {h}x{w} = {h * w} vectors of {encoder.out_dim} numbers"


def _stage1_section(runs_dir: Path, variants: list[str], seeds: list[str]) -> list[str]:
    """What each variant's BLIP-2 stage-1 run learned on its own (retrieval vs chance, ITM, attention)."""
    runs = stage1_rows(runs_dir, variants, seeds)
    if not runs:
        return []
    metrics = [(name, key, False) for name, key in STAGE1_METRICS]
    out = [
        "<h2>Stage 1 alone: the Q-Former before the LLM sees it</h2><p>Image-text retrieval by the stage-1 "
        "similarity (max over queries) on the same split, with its chance level, and the matching head's accuracy "
        "on true vs swapped pairs (chance 0.5).</p><table><tr><th>variant</th><th>runs</th>"
        + "".join(f"<th>{html.escape(n)}</th>" for n, _ in STAGE1_METRICS)
        + "</tr>"
    ]
    for v, r in runs.items():
        cells = metric_cells(r, metrics, " &plusmn; ")
        out.append(f"<tr><td>{html.escape(v)}</td><td>{len(r)}</td>" + "".join(f"<td>{c}</td>" for c in cells))
        out.append("</tr>")
    out.append("</table>")
    return out


def _metric_legend(metrics) -> list[tuple[str, str]]:
    return [
        (n, METRIC_MEANING.get(n, "share of test captions that name exactly the true value(s); higher is better"))
        for n, _, _ in metrics
    ]


def _attention_maps(run: Path, count: int) -> list[Path]:
    """The run's attention-map pictures for `count` test images (two-object scenes first), drawn now if missing
    (Q-Former only)."""
    if count <= 0 or not (run / "eval.json").exists():
        return []
    from ..config import load_config

    if load_config(run / "config.yaml").connector.type not in ("qformer", "xattn"):
        return []
    result = json.loads((run / "eval.json").read_text())
    row = next(iter(result["rows"].values()))  # the run's own row comes first, then controls / baselines
    # two-object scenes first (synthetic world): where queries could divide the objects among them
    two = [e for e in row["examples"] if caption_attributes(e["references"][0])["count"] == 2]
    images = [e["image"] for e in (two + [e for e in row["examples"] if e not in two])[:count]]
    done = [run / "inspect" / f"{Path(i).stem}.png" for i in images]
    missing = [i for i, p in zip(images, done) if not p.exists()]
    if missing:
        from ..run import load_run
        from .inspect import draw_inspection, inspect_image

        model = load_run(run)
        for image in missing:
            draw_inspection(
                inspect_image(model, image),
                run / "inspect" / f"{Path(image).stem}.png",
                f"{run.parent.name}: cross-attention (last layer) per query",
            )
    return done


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f2f2f2; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 8px; }}
code, pre {{ background: #f6f6f6; }}
.better {{ color: #0a7a0a; font-weight: bold; }} .worse {{ color: #b00020; font-weight: bold; }} .noise {{ color: #999; }}
</style></head>
<body>
{body}
<script>
// a check a headless browser can read: how many images decoded
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""
