"""lmms-eval plugin: `python -m lmms_eval --model vlmlab --model_args run=RUN_DIR --tasks vlmlab_pope ...`.

lmms-eval 0.7.3 finds plugin models through the `lmms_eval.models` entry-point group (pyproject.toml), whose
payload is a ModelManifest; `@register_model` alone does not make `--model` find a class outside its tree.
"""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmlab", simple_class_path="vlmlab.integrations.lmms_eval.model.VlmlabLMM")
