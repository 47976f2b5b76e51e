"""`python -m search_svc`: run SearchService (flags / ALPHAMATH_SEARCH_* variables; --help)."""
import sys

from search_svc.server import main

sys.exit(main())
