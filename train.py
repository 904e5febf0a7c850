"""``python -m lumina_turbo.train --config file.toml``: headless AC-RF LoRA training (see training/cli.py)."""

import sys

from .training.cli import main

if __name__ == "__main__":
    sys.exit(main())
