"""alphamath: AlphaMath Almost Zero (arXiv 2405.03553) as a service system.

The shared library holds what several services need: the step format, the tree schema,
answer checking, the engine interfaces and the causal LM with a value head.
"""
import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting make torch 10-30x slower as soon as anything else wants
# the CPU (the sandbox, answer workers, another service on the node): measured 108 s vs 4.2 s for
# the same decode on 2 busy cores. Passive waiting must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
