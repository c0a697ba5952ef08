"""The team stack's state file and credentials: a forged state file signals and deletes nothing, secrets go
to no command line and sit in files only their owner can read, and `down` leaves none of its sockets behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from .helpers import REPO, free_port

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def _stack_down(state_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf.cli", "stack", "down", "--dir", str(state_dir)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("home", ["victim", "tmp-lookalike"])
def test_a_forged_state_file_signals_and_deletes_nothing(home, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    if home == "tmp-lookalike":  # the right name, but not where `up` makes it
        victim = tmp_path / "imgclf-stack-forged"
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me")
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state_dir = tmp_path / ".stack"
        state_dir.mkdir()
        (state_dir / "stack.json").write_text(json.dumps(
            {"home": str(victim), "weed_pid": bystander.pid, "pg_port": 1, "pg_user": "x", "pg_password": "x",
             "s3_port": 1, "s3_access_key": "x", "s3_secret_key": "x", "weed_ports": [1] * 7}))
        out = _stack_down(state_dir, tmp_path)
        assert out.returncode == 1 and "refusing to stop or delete anything" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert (victim / "precious.txt").read_text() == "keep me"
        time.sleep(0.2)
        assert bystander.poll() is None, "an unrelated process group was signalled"
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait()


def test_a_state_file_naming_a_reused_pid_does_not_signal_it(tmp_path):
    """The folder is a real stack folder, but the pid now belongs to another program."""
    home = Path(tempfile.mkdtemp(prefix="imgclf-stack-", dir=Path(tempfile.gettempdir()).resolve()))
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state_dir = tmp_path / ".stack"
        state_dir.mkdir()
        (state_dir / "stack.json").write_text(json.dumps({"home": str(home), "weed_pid": bystander.pid}))
        out = _stack_down(state_dir, tmp_path)
        assert out.returncode == 0, out.stderr
        time.sleep(0.2)
        assert bystander.poll() is None and not home.exists()
    finally:
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait()


def test_the_s3_secret_goes_to_no_command_line_and_a_0600_file(tmp_path):
    """Every process started while the remote is set is recorded by a Python audit hook: none carries the secret."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    local = tmp_path / ".dvc" / "config.local"
    local.write_text("[core]\n    autostage = false\n")
    os.chmod(local, 0o644)  # as an older version left it
    script = textwrap.dedent("""
        import json, sys
        seen = []
        sys.addaudithook(lambda event, args: seen.append(repr(args)) if event in ("subprocess.Popen", "os.exec",
                                                                                  "os.posix_spawn") else None)
        from pathlib import Path
        from imgclf.ops.versioning import set_s3_remote
        set_s3_remote("stack", "s3://dvc/imgclf", "http://127.0.0.1:1", "AKIDEXAMPLE", "s3cr3t-NEVER-in-ps", Path("."))
        print(json.dumps(seen))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not any("s3cr3t" in args for args in json.loads(out.stdout.strip().splitlines()[-1]))
    assert oct(local.stat().st_mode & 0o777) == "0o600"
    text = local.read_text()
    assert "s3cr3t-NEVER-in-ps" in text and "autostage = false" in text and "remote = stack" in text
    listed = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout
    assert "stack" in listed and "s3://dvc/imgclf" in listed


def test_down_removes_the_grpc_sockets_of_its_own_ports_only(tmp_path):
    """SeaweedFS's gRPC servers leave /tmp/seaweedfs-<service>-grpc-<port>.sock behind (no flag moves them):
    `stack down` removes the sockets of the stack's ports; a plain file or a link under such a name, or another
    stack's socket, stays."""
    import socket

    home = Path(tempfile.mkdtemp(prefix="imgclf-stack-", dir=Path(tempfile.gettempdir()).resolve()))
    ports = [free_port() for _ in range(4)]
    mine, planted, link, other = (Path(f"/tmp/seaweedfs-{s}-grpc-{p}.sock")
                                  for s, p in zip(("master", "volume", "filer", "s3"), ports))
    servers = []
    try:
        for path in (mine, other):
            servers.append(socket.socket(socket.AF_UNIX))
            servers[-1].bind(str(path))
        planted.write_text("not a socket")
        link.symlink_to(tmp_path / "target")
        (tmp_path / "target").write_text("kept")
        state_dir = tmp_path / ".stack"
        state_dir.mkdir()
        (state_dir / "stack.json").write_text(json.dumps({"home": str(home), "weed_pid": None,
                                                          "weed_ports": ports[:3], "s3_port": 1}))
        out = _stack_down(state_dir, tmp_path)
        assert out.returncode == 0, out.stderr
        assert not mine.exists() and planted.read_text() == "not a socket" and link.is_symlink() and other.exists()
    finally:
        for s in servers:
            s.close()
        for path in (mine, planted, link, other):
            path.unlink(missing_ok=True)
