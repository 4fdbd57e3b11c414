"""Run fmcache from a checkout without installing: ``python cli.py extract …``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmcache.cli import main

if __name__ == "__main__":
    main()
