"""The Face: what a user runs. The `alphamath` CLI (solve, eval, generate, value-report, the local
stack), the gRPC client of the search service, and the local stack of service processes.

It sits on top of everything: it imports the library and the services' public entry points, and
nothing imports it back (tests/test_layout.py checks the direction)."""
