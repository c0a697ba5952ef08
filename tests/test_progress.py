"""The heartbeat that keeps long, silent steps from leaving a log quiet."""

import time

from imgclf.progress import heartbeat


def test_heartbeat_names_the_current_step_and_its_own_time():
    lines: list[str] = []
    with heartbeat(lines.append, "pictures", every=0.05) as step:
        time.sleep(0.3)
        step("upload")
        time.sleep(0.12)
    said = len(lines)
    time.sleep(0.15)
    assert len(lines) == said  # stops with the step
    assert lines[0].startswith("pictures (still working,") and lines[-1].startswith("upload (still working, 0 s)")
    assert any(line.startswith("upload") for line in lines) and lines.index(next(x for x in lines if x.startswith(
        "upload"))) >= 3
