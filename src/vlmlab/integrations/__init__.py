"""vlmlab inside the tools people already use: an lmms-eval model plugin and a VLMEvalKit adapter."""
