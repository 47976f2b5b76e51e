"""alphamath/service.py's CPU sizing: torch's threads follow the pod's CPU limit, not the node's cores."""
from __future__ import annotations

import os

import pytest

from alphamath.service import cpu_quota, cpu_threads


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None) -> str:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("v2, v1, want", [
    ("200000 100000", None, 2.0),       # cgroup v2, a 2-CPU limit
    ("150000 100000", None, 1.5),
    ("max 100000", None, None),         # v2, no limit
    (None, ("300000", "100000"), 3.0),  # cgroup v1
    (None, ("-1", "100000"), None),     # v1, no limit
    (None, None, None),                 # no cgroup files (not Linux, or not mounted)
    ("garbage", None, None),
])
def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path, v2, v1, want):
    assert cpu_quota(_cgroup(tmp_path, v2, v1)) == want


def test_cpu_threads_follow_the_quota_the_affinity_and_omp_num_threads(tmp_path, monkeypatch):
    def limit(name: str, cpu_max: str) -> str:
        (tmp_path / name).mkdir()
        return _cgroup(tmp_path / name, cpu_max)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)  # a 64-core node
    assert cpu_threads({}, limit("a", "200000 100000")) == 2
    assert cpu_threads({}, limit("b", "150000 100000")) == 1  # never more threads than the quota
    assert cpu_threads({}, limit("c", "50000 100000")) == 1
    assert cpu_threads({}, limit("d", "max 100000")) == 64
    assert cpu_threads({"OMP_NUM_THREADS": "3"}, limit("e", "200000 100000")) == 3  # an explicit setting wins
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads({}, limit("f", "800000 100000")) == 2  # a CPU set smaller than the quota


def test_serve_models_reports_ready_once_the_first_model_is_served_and_follows_swaps():
    """A model service reports SERVING only once its main thread serves (before, a request would compute
    on its handler's thread); a swapped-in checkpoint is served next; a remote backend is ready at once."""
    import threading

    from alphamath.service import serve_models

    done, served, ready = threading.Event(), [], []
    models = ["A"]

    class FakeLM:
        def __init__(self, name):
            self.name = name

        def serve(self, until):
            served.append((self.name, len(ready)))
            assert not until()  # the first call: serving
            if self.name == "A":
                models[0] = "B"  # a checkpoint is swapped in
            else:
                done.set()
            assert until()

    lms = {"A": FakeLM("A"), "B": FakeLM("B")}
    serve_models(done, lambda: lms[models[0]], ready=lambda: ready.append(1))
    assert served == [("A", 0), ("B", 1)] and ready == [1]  # ready once, only after serving began

    remote = []
    serve_models(threading.Event(), lambda: None, ready=lambda: remote.append(1))
    assert remote == [1]
