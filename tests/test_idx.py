import gzip
import subprocess
import sys

import numpy as np
import pytest

from imgclf.data.idx import IMAGES_MAGIC, IDXError, read_idx, read_pair, write_idx


def test_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", IMAGES_MAGIC), arr)


def test_wrong_magic_names_file(tmp_path):
    write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(IDXError, match=r"labels.gz: wrong magic number 0x00000801"):
        read_idx(tmp_path / "labels.gz", IMAGES_MAGIC)


def test_truncated_payload(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((4, 28, 28), np.uint8))
    data = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "x.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(IDXError, match=r"x.gz: payload is 3036 bytes.*truncated"):
        read_idx(tmp_path / "x.gz", IMAGES_MAGIC)


def test_truncated_gzip_stream(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((4, 28, 28), np.uint8))
    raw = (tmp_path / "x.gz").read_bytes()
    (tmp_path / "x.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IDXError, match="x.gz: cannot read"):
        read_idx(tmp_path / "x.gz", IMAGES_MAGIC)


def test_count_mismatch(tmp_path):
    write_idx(tmp_path / "img.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "lab.gz", np.zeros(3, np.uint8))
    with pytest.raises(IDXError, match=r"lab.gz: 3 labels for 4 images"):
        read_pair(tmp_path / "img.gz", tmp_path / "lab.gz")


@pytest.mark.integration
def test_errors_survive_python_O(tmp_path):
    """Real exceptions, not asserts: still raised when asserts are stripped."""
    write_idx(tmp_path / "lab.gz", np.zeros(3, np.uint8))
    code = (f"from imgclf.data.idx import read_idx, IDXError\n"
            f"try:\n    read_idx({str(tmp_path / 'lab.gz')!r}, {IMAGES_MAGIC})\n"
            f"except IDXError as e:\n    print('caught', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert "caught" in out.stdout and "wrong magic" in out.stdout


def test_a_gzip_bomb_is_refused_from_its_header_before_it_expands(tmp_path, monkeypatch):
    """A small gzip can hold gigabytes of zeros behind a header that declares them: the declared size is checked
    first (the limit is lowered here so that the bomb stays small)."""
    from imgclf.data import idx

    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 8 << 20)
    count = 20_000  # 20,000 x 28 x 28 = 15.7 MB of zeros, about 15 KB compressed
    header = idx.IMAGES_MAGIC.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as fh:
        fh.write(header)
        for _ in range(count // 1000):
            fh.write(bytes(1000 * 28 * 28))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(idx.IDXError, match=r"bomb-idx3-ubyte.gz: declares \[20000, 28, 28\] \(15,680,000 bytes\), more"):
        idx.read_idx(bomb, idx.IMAGES_MAGIC)
