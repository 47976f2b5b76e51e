"""alphamath tests."""
import os
import sys

# The suite runs many model processes and threads on a few cores at once: passive OpenMP waiting
# (see alphamath/__init__.py). Benchmarks (python -m tests.bench*) keep the library default.
if "pytest" in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import alphamath  # noqa: E402,F401 - sets the OpenMP wait policy before torch loads
