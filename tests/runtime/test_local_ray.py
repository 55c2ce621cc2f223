"""Starting the embedded local Ray: a start whose node does not come up (Ray's 30 s startup timeout,
seen on a loaded machine) is retried once, and what the failed attempt started is stopped. Ray's
startup failure cannot be produced on demand, so `ray.init` is replaced here by one that starts a
real child process (standing in for the failed attempt's GCS) and raises Ray's error."""

import subprocess

import pytest
import ray

from specrouter.runtime import actors

TIMEOUT = "The current node timed out during startup."


@pytest.fixture
def failing_starts(monkeypatch):
    """ray.init that fails `n` times (each leaving a child process behind), then succeeds."""
    state = {"fail": 0, "calls": 0, "children": []}

    def init(**options):
        state["calls"] += 1
        if state["calls"] <= state["fail"]:
            state["children"].append(subprocess.Popen(["sleep", "120"]))
            raise Exception(TIMEOUT)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    yield state
    for child in state["children"]:
        child.kill()
        child.wait()


def test_a_local_ray_that_does_not_come_up_is_started_again_and_its_leftovers_stopped(failing_starts, capsys):
    failing_starts["fail"] = 1
    assert actors.start_local_ray(num_cpus=2) is True
    assert failing_starts["calls"] == 2
    (leftover,) = failing_starts["children"]
    assert leftover.wait(timeout=30) != 0  # killed
    assert "did not start" in capsys.readouterr().err


def test_a_local_ray_that_fails_every_start_raises_rays_error(failing_starts):
    failing_starts["fail"] = actors.LOCAL_RAY_STARTS
    with pytest.raises(Exception, match="timed out during startup"):
        actors.start_local_ray(num_cpus=2)
    assert failing_starts["calls"] == actors.LOCAL_RAY_STARTS
    assert all(child.wait(timeout=30) != 0 for child in failing_starts["children"])
