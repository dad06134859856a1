"""The nanochat-studio trainer: a small GPT trained from scratch.

Runs alone (``python -m trainer.train --help``) and never imports ``nanochat_studio``.
Only ``trainer.sizing`` and ``trainer.progress`` are torch-free; the web app may import those two.
"""
