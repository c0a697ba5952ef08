from pathlib import Path

import pytest

from imgclf.data.fetch import DownloadError, download_files

from .helpers import MNIST_NAMES, MirrorServer, cli, write_params


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.integration
def test_http_mirror_success_and_skip_when_verified(tmp_path, tiny_mnist, mirror_server):
    _, md5s = tiny_mnist
    out = tmp_path / "raw"
    results = download_files(out, md5s, [mirror_server.url], backoff_s=0)
    assert [r.mirror for r in results] == [mirror_server.url] * 4
    assert _leftovers(out) == sorted(MNIST_NAMES)
    mirror_server.requests.clear()
    again = download_files(out, md5s, [mirror_server.url], backoff_s=0)
    assert all(r.mirror is None for r in again) and mirror_server.requests == []


@pytest.mark.integration
def test_a_mirrors_password_is_sent_as_basic_auth_and_never_printed(tmp_path, tiny_mnist, mirror_server):
    """`user:password@` in a mirror URL is a login (urllib alone would take it for part of the host), and the
    password appears in no log line, no error and no result."""
    import base64

    _, md5s = tiny_mnist
    mirror_server.auth = "Basic " + base64.b64encode(b"bob:s3cretpw").decode()
    host = mirror_server.url.split("://", 1)[1]
    logs: list[str] = []
    with pytest.raises(DownloadError) as refused:
        download_files(tmp_path / "raw", md5s, [f"http://bob:wrongpw@{host}"], backoff_s=0, log=logs.append)
    assert "HTTP 401" in str(refused.value) and "wrongpw" not in str(refused.value) + "".join(logs)
    results = download_files(tmp_path / "raw", md5s, [f"http://bob:s3cretpw@{host}"], backoff_s=0, log=logs.append)
    assert [r.mirror for r in results] == [f"http://{host}"] * 4  # as the summary shows it: no login
    assert _leftovers(tmp_path / "raw") == sorted(MNIST_NAMES)
    assert "s3cretpw" not in "".join(logs)


@pytest.mark.integration
def test_flaky_mirror_is_retried(tmp_path, tiny_mnist, mirror_server):
    _, md5s = tiny_mnist
    mirror_server.faults["train-images-idx3-ubyte.gz"] = [503, 500]
    logs: list[str] = []
    download_files(tmp_path / "raw", md5s, [mirror_server.url], retries=3, backoff_s=0.01, log=logs.append)
    assert mirror_server.requests.count("train-images-idx3-ubyte.gz") == 3
    assert any("retrying" in m and "HTTP 503" in m for m in logs)


@pytest.mark.integration
def test_missing_on_first_mirror_falls_through(tmp_path, tiny_mnist, mirror_server):
    src, md5s = tiny_mnist
    empty = tmp_path / "empty"
    empty.mkdir()
    dead = MirrorServer(empty)
    try:
        results = download_files(tmp_path / "raw", md5s, [dead.url, str(src)], backoff_s=0)
    finally:
        dead.close()
    assert {r.mirror for r in results} == {str(src)}


@pytest.mark.integration
def test_corrupted_file_tries_other_mirrors_and_leaves_nothing(tmp_path, tiny_mnist, mirror_server):
    src, md5s = tiny_mnist
    bad = src / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-7])  # truncated .gz: wrong MD5
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as exc:
        download_files(out, md5s, [mirror_server.url, str(src)], backoff_s=0)
    msg = str(exc.value)
    assert msg.startswith("t10k-labels-idx1-ubyte.gz") and mirror_server.url in msg and str(src) in msg
    assert "MD5 mismatch" in msg
    assert "t10k-labels-idx1-ubyte.gz" not in _leftovers(out)
    assert not [n for n in _leftovers(out) if n.endswith(".tmp")]


@pytest.mark.integration
def test_cli_corrupted_real_mnist_over_http(workdir, shared_mnist, tmp_path):
    """Real MNIST served on loopback with one archive cut short: exit 1, file and mirror named."""
    mirror = tmp_path / "served"
    mirror.mkdir()
    for name in MNIST_NAMES:
        (mirror / name).symlink_to(shared_mnist / name)
    (mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes((shared_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes()[:4000])
    server = MirrorServer(mirror)
    try:
        res = cli("download", "--mirror", server.url, "--set", "runtime.download.backoff_s=0")
    finally:
        server.close()
    assert res.exit_code == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: t10k-labels-idx1-ubyte.gz") and server.url in last
    raw = workdir / "data" / "raw" / "mnist"
    assert sorted(p.name for p in raw.iterdir()) == sorted(n for n in MNIST_NAMES if not n.startswith("t10k-labels"))


def test_cli_mirror_from_environment(workdir, shared_mnist):
    res = cli("download", env={"IMGCLF_MIRROR": str(shared_mnist)})
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (workdir / "data/raw/mnist").iterdir()) == sorted(MNIST_NAMES)


@pytest.mark.integration
def test_cli_unreachable_mirror_fails_cleanly(workdir, tmp_path):
    write_params(workdir / "params.yaml", {"runtime.download.retries": 2, "runtime.download.backoff_s": 0,
                                           "runtime.download.timeout_s": 2})
    res = cli("download", "--mirror", "http://127.0.0.1:9/mnist/")
    assert res.exit_code == 1
    assert "train-images-idx3-ubyte.gz" in res.stderr and "127.0.0.1:9" in res.stderr
    assert not list((workdir / "data").rglob("*.gz")) if (workdir / "data").exists() else True  # nothing partial
