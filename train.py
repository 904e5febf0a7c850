"""``python -m lumina_turbo.train --config file.toml``: headless AC-RF LoRA training (see training/cli.py)."""

import sys

from .training.cli import main

if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C outside main's own handling (e.g. while it returns)
        code = 130
    sys.exit(code)
