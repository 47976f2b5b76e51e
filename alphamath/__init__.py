"""alphamath: AlphaMath Almost Zero (arXiv 2405.03553) as a service system.

The shared library holds what several services need: the step format, the tree schema,
answer checking, the engine interfaces and the causal LM with a value head.
"""
__version__ = "0.1.0"
