"""The real MNIST files from ../shared, used as a local mirror."""

import json

import pytest

from .helpers import cli

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_download_and_prepare_real_mnist(workdir, shared_mnist):
    assert cli("download", "--mirror", str(shared_mnist)).exit_code == 0
    assert cli("prepare").exit_code == 0
    meta = json.loads((workdir / "data/processed/meta.json").read_text())
    assert meta["sizes"] == {"train": 48000, "val": 12000, "test": 10000}
    assert [meta["counts"]["test"][str(d)] for d in range(10)] == TEST_COUNTS
    for d, n in enumerate(TRAIN_COUNTS):
        tr, va = meta["counts"]["train"][str(d)], meta["counts"]["val"][str(d)]
        assert tr + va == n
        assert abs(va - n * 0.2) <= 1 and abs(tr - n * 0.8) <= 1
