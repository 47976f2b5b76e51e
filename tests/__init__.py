"""alphamath tests."""
import alphamath  # noqa: F401 - sets the OpenMP wait policy before torch loads
