"""``python -m nanochat_studio``: the same command line as ``nanochat-studio``."""

from .cli import main

if __name__ == "__main__":
    main()
