"""sandbox_svc"""

import alphamath  # noqa: F401,E402 - sets the OpenMP wait policy before torch loads
