"""The local code sandbox: the library's implementation of `alphamath.interfaces.Sandbox`.

`executor.Executor` runs a path's code cells in a fresh gVisor (or, opted in, bubblewrap) sandbox,
as `alphamath.lm` is the local model that policy_svc and value_svc serve; sandbox_svc serves it
over gRPC. `runner.py` is the standalone script the executor runs inside each sandbox: it is
passed as source to the sandboxed interpreter and imports nothing from this repository.
"""
