"""`python -m app`: the `alphamath` command."""
import sys

from app.cli import main

sys.exit(main())
