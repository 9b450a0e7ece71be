"""A run folder: what it holds and how it is opened, by training and by everything that reads a run.

    record.py     the files a run folder holds, and the checks made before anything in it changes
    lock.py       one writer per run folder
    checkpoint.py the trained weights with a SHA-256 manifest, written crash-safely, verified before loading
    load.py       `load_run`: a finished run -> a model ready to caption, without the training code
    lifecycle.py  the sequence every training entry point goes through before its first step

Between `model` and `train`: eval, the app and the integrations open runs through here and never import `train`.
`import vlmlab.run` itself loads neither torch nor the model code (load_run imports them when called).
"""

from .load import load_run

__all__ = ["load_run"]
