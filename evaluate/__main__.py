"""`python -m evaluate`: see evaluate/cli.py and --help."""
import sys

from .cli import main

sys.exit(main())
