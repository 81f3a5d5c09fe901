"""The safe tensor container: exact round trip, and clear errors for bad files."""

import pytest
import torch

from pgolf.shared import tensorfile
from pgolf.shared.tensorfile import TensorFileError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(4, generator=g).half(),
        "wbf": torch.randn(2, 3, generator=g).bfloat16(),
        "q": torch.randint(-31, 32, (6, 7), generator=g, dtype=torch.int8),
        "flag": torch.tensor([True, False]),
        "n": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }


def test_round_trip_is_bit_exact(tmp_path):
    t = _tensors()
    path = tmp_path / "x.pgt"
    tensorfile.save(path, t, kind="unit", meta={"a": 1})
    back, header = tensorfile.load(path, kind="unit")
    assert list(back) == list(t) and header["meta"] == {"a": 1}
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        bits = (lambda x: x) if k == "flag" else (lambda x: x.reshape(-1).view(torch.uint8))
        assert torch.equal(bits(back[k]), bits(t[k]))


def test_bad_files_name_the_problem(tmp_path):
    blob = tensorfile.dumps(_tensors(), kind="unit")
    cases = {
        "truncated payload": blob[:-3],
        "bad magic": b"NOTOURS!" + blob[8:],
        "checksum mismatch": blob[:-1] + bytes([blob[-1] ^ 1]),
        "truncated header": blob[:20],
    }
    for msg, data in cases.items():
        with pytest.raises(TensorFileError, match=msg):
            tensorfile.loads(data, "f.pgt")
    with pytest.raises(TensorFileError, match="expected 'other'"):
        tensorfile.loads(blob, "f.pgt", kind="other")
    with pytest.raises(TensorFileError, match="not found"):
        tensorfile.load(tmp_path / "missing.pgt")


def test_version_mismatch_is_reported():
    blob = tensorfile.dumps({"a": torch.zeros(1)}, kind="unit")
    hacked = blob.replace(b'"version":1', b'"version":9')
    with pytest.raises(TensorFileError, match="version 9 unsupported"):
        tensorfile.loads(hacked, "f.pgt")


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    from pgolf.shared.io import atomic_write_text, staged_dir

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with staged_dir(tmp_path / "out") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert (tmp_path / "out" / "f").read_text() == "y"
