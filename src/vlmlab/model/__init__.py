"""The model path in reading order: vision -> connector (qformer, projection) -> language_model -> sequence -> vlm."""
