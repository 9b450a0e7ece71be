"""vlmlab: build, train and dissect small vision-language models."""

__version__ = "0.1.0"
