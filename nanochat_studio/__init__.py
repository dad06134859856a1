"""nanochat-studio: train a small GPT from scratch, watch it learn, chat with it, download it."""

__version__ = "0.1.0"
