"""`python -m storykit ...`: the headless workflow runner (see runner/cli.py)."""
import sys

from .runner.cli import main

sys.exit(main())
