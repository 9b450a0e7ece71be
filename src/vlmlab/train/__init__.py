"""Training: `setup` -> `resume_from` -> `fit` (loop.py), BLIP-2 stage 1 (stage1_loop.py), stages (stages.py).

What a run folder holds and how a finished run is opened live one layer down, in `vlmlab.run`.
"""
