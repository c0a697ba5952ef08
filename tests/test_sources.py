"""The MNIST family as data sources: checksums (archive MD5 or content SHA-256), QMNIST's int labels,
EMNIST's zip, official class names and order, sample ids, per-source model names."""

import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from imgclf import config
from imgclf.config import ConfigError
from imgclf.data.fetch import DownloadError, download_files
from imgclf.data.idx import write_idx
from imgclf.data.mnist_family import MEMBER_SUMS, download_source
from imgclf.data.sources import FASHION_MNIST, MNIST, SOURCE_NAMES, IdxSource, RawFile
from imgclf.data.splits import load_idx_source

from .helpers import cli, require, separable_digits, write_params

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_every_source_is_registered_and_an_unknown_one_names_them():
    from imgclf.data.datasource import DATA_SOURCES, data_source

    assert list(DATA_SOURCES) == list(SOURCE_NAMES)
    for name in SOURCE_NAMES:  # every one answers the whole interface
        src = data_source(name)
        assert src.name == name and src.recipe.epochs > 0 and isinstance(src.takes_link, bool)
    with pytest.raises(ConfigError, match=r"^data.source: must be one of mnist, fashion-mnist, .*imagefolder; got 'cifar'"):
        config.from_dict({"data": {"source": "cifar"}})


def test_recompressed_copy_is_accepted_by_content_and_a_changed_one_refused(tmp_path, shared_mnist):
    labels = MNIST.test[1]
    content = gzip.decompress((shared_mnist / labels.name).read_bytes())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / labels.name).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert hashlib.md5((mirror / labels.name).read_bytes()).hexdigest() != labels.md5
    (got,) = download_files(tmp_path / "raw", [labels], [str(mirror)], backoff_s=0)
    assert got.mirror == str(mirror)
    assert gzip.decompress(got.path.read_bytes()) == content

    changed = bytearray(content)
    changed[-1] ^= 1
    (mirror / labels.name).write_bytes(gzip.compress(bytes(changed)))
    with pytest.raises(DownloadError, match="checksum mismatch.*content SHA-256"):
        download_files(tmp_path / "other", [labels], [str(mirror)], backoff_s=0)
    assert not (tmp_path / "other" / labels.name).exists()


def _tiny_source(root: Path, name: str, labels_int: bool = False) -> IdxSource:
    """Tiny files with the layout of a real source; their own MD5s stand in for the published ones."""
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for part, n, seed in (("train", 60, 0), ("t10k", 20, 1)):
        x, y = separable_digits(n, seed)
        images, labels = f"{name}-{part}-images-idx3-ubyte.gz", f"{name}-{part}-labels.gz"
        write_idx(root / images, x)
        if labels_int:  # QMNIST: 8 int32 columns, the class first
            table = np.zeros((n, 8), dtype=np.int32)
            table[:, 0], table[:, 5] = y, 70000 + np.arange(n)
            write_idx(root / labels, table)
        else:
            write_idx(root / labels, y)
        specs += [RawFile(f, hashlib.md5((root / f).read_bytes()).hexdigest()) for f in (images, labels)]
    return IdxSource(name, (specs[0], specs[1]), (specs[2], specs[3]), tuple("abcdefghij"), ())


def test_qmnist_int_labels_take_the_class_column(tmp_path):
    source = _tiny_source(tmp_path / "mirror", "qmnist", labels_int=True)
    download_files(tmp_path / "raw", list(source.files), [str(tmp_path / "mirror")], backoff_s=0)
    train, test, classes = load_idx_source(tmp_path / "raw", source)
    _, want = separable_digits(60, 0)
    np.testing.assert_array_equal(train.labels, want)
    assert classes == list("abcdefghij") and len(test.labels) == 20
    assert test.ids[3] == "qmnist-t10k-images-idx3-ubyte.gz:3"


def test_emnist_zip_members_verified_taken_out_and_transposed(tmp_path):
    members = _tiny_source(tmp_path / "parts", "emnist-letters")
    for part, n, seed in (("train", 60, 0), ("t10k", 20, 1)):
        write_idx(tmp_path / "parts" / f"emnist-letters-{part}-labels.gz", separable_digits(n, seed)[1] + 1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in members.files:
            zf.writestr(f"gzip/{f.name}", (tmp_path / "parts" / f.name).read_bytes())
        zf.writestr("gzip/emnist-digits-train-images-idx3-ubyte.gz", b"another split, not taken out")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "gzip.zip").write_bytes(buf.getvalue())
    archive = RawFile("gzip.zip", hashlib.md5(buf.getvalue()).hexdigest())
    source = IdxSource("emnist-letters", members.train, members.test, tuple("abcdefghij"), (), archive=archive,
                       transpose=True, label_offset=1)
    dest = tmp_path / "data/raw/emnist-letters"
    got = download_source(dest, source, [str(mirror)], backoff_s=0)
    assert sorted(p.name for p in dest.iterdir()) == sorted([f.name for f in source.files] + [MEMBER_SUMS])
    assert not list((tmp_path / "data").glob(".raw-archives/*"))  # the 0.5 GB zip does not stay
    assert all(r.mirror == str(mirror) for r in got)
    again = download_source(dest, source, [str(tmp_path / "nowhere")], backoff_s=0)
    assert all(r.mirror is None for r in again)  # verified by SHA256SUMS, nothing fetched

    train, _, classes = load_idx_source(dest, source)
    x, y = separable_digits(60, 0)
    np.testing.assert_array_equal(train.images, x[:, None].transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(train.labels, y)  # stored as y + 1: letters count from 1 in the files
    assert classes == list("abcdefghij")

    (mirror / "gzip.zip").write_bytes(buf.getvalue()[:-10])
    (dest / MEMBER_SUMS).unlink()
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        download_source(dest, source, [str(mirror)], backoff_s=0)


def test_label_outside_the_classes_is_refused_naming_the_file(tmp_path):
    source = _tiny_source(tmp_path / "raw", "kmnist")
    source = IdxSource("kmnist", source.train, source.test, ("o", "ki"), ())  # 10 labels, 2 names
    with pytest.raises(ValueError, match=r"kmnist-train-labels.gz: label \d is outside kmnist's 2 classes"):
        load_idx_source(tmp_path / "raw", source)


def test_per_source_defaults(tmp_path):
    cfg = config.from_dict({"data": {"source": "fashion-mnist"}})
    assert cfg.model_name == "imgclf-fashion-mnist" and cfg.mirrors == list(FASHION_MNIST.mirrors)
    assert config.from_dict({"data": {"source": "imagefolder", "path": str(tmp_path / "My Pets!")}}).model_name \
        == "imgclf-My-Pets"
    named = config.from_dict({"data": {"source": "kmnist"}, "register": {"model_name": "mine"}})
    assert named.model_name == "mine"
    with pytest.raises(config.ConfigError, match="data.classes: only for imagefolder"):
        config.from_dict({"data": {"source": "mnist", "classes": ["a", "b"]}})


@pytest.mark.slow
def test_fashion_mnist_from_the_debian_package(workdir):
    """Debian's dataset-fashion-mnist is re-compressed (other MD5s): its content SHA-256 vouches for it."""
    require((DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
            f"{DEBIAN_FASHION} (Debian package dataset-fashion-mnist; .ci/run installs it)")
    write_params(workdir / "params.yaml", {"data.source": "fashion-mnist", "paths.dvc_file": None})
    res = cli("download", "--mirror", str(DEBIAN_FASHION))
    assert res.exit_code == 0, res.output
    assert cli("prepare").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    assert meta["classes"] == list(FASHION_MNIST.classes) and meta["sizes"]["test"] == 10000
    assert meta["counts"]["test"]["Ankle boot"] == 1000


def test_recipe_defaults_follow_the_source_and_yield_to_explicit_params():
    aug = lambda raw: config.from_dict(raw).train  # noqa: E731
    fashion, mnist = aug({"data": {"source": "fashion-mnist"}}), aug({})
    assert (fashion.augment_shift, fashion.augment_flip, fashion.max_epochs) == (1, True, 16)
    assert (mnist.augment_shift, mnist.augment_flip, mnist.max_epochs) == (2, False, 12)
    assert aug({"data": {"source": "imagefolder", "path": "x"}}).augment_flip is False
    mine = aug({"data": {"source": "fashion-mnist"}, "train": {"augment_shift": 3, "augment_flip": False}})
    assert (mine.augment_shift, mine.augment_flip) == (3, False)
    mlp = aug({"data": {"source": "fashion-mnist"}, "model": {"kind": "mlp"}})  # the MLP's TRAIN_DEFAULTS set shift 1
    assert (mlp.augment_shift, mlp.augment_flip, mlp.max_epochs) == (1, True, 24)
