"""What a person runs to try a model: the terminal demo."""
