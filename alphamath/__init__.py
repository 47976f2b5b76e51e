"""alphamath: AlphaMath Almost Zero (arXiv 2405.03553) as a service system.

The shared library holds what several services need: the step format, the tree schema, answer
checking, the search protocols with their local backends (the prefix-cached LM with a value head,
the gVisor sandbox) and gRPC clients, and the serving pieces every server shares. It imports no
service and not the Face (`app/`); tests/test_layout.py checks that.
"""
import os

__version__ = "0.1.0"

# How torch's OpenMP threads wait between the hundreds of small ops of a decode step (measured on
# 2 cores, SmolLM2-135M bf16, 5 samples; ms per decoded token, quiet / two model processes at once):
#   spin 300k (libgomp default) 42 / 360   spin 10k 45 / 130   spin 3k 54 / 86   PASSIVE 72 / 71
# A short spin keeps one model process nearly as fast as full spinning, and stops spinning threads
# from starving everything else when the cores are shared. Where several model processes share a
# few cores (the test suite, the local stack at high concurrency) PASSIVE is better: set
# OMP_WAIT_POLICY=PASSIVE. Both must be set before torch loads its OpenMP runtime.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
