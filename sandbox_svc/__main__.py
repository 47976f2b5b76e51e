"""`python -m sandbox_svc`: run SandboxService (flags / ALPHAMATH_SANDBOX_* variables; --help)."""
import sys

from sandbox_svc.server import main

sys.exit(main())
