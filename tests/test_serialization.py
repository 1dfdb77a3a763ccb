import pytest
import torch

from prefixlens.serialization import atomic_write_text, load_tensors, save_tensors


def test_round_trip_and_metadata(tmp_path):
    path = save_tensors(tmp_path / "a" / "x.safetensors", {"w": torch.arange(3.0)}, {"k": "v"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta["k"] == "v"


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.ones(2)}, {})
    with pytest.raises(Exception):
        save_tensors(path, {"w": "not a tensor"}, {})
    assert torch.equal(load_tensors(path)[0]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_atomic_text(tmp_path):
    atomic_write_text(tmp_path / "r.md", "hello")
    assert (tmp_path / "r.md").read_text() == "hello"
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "missing.safetensors")


def test_written_files_follow_the_umask(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
        save_tensors(tmp_path / "t.safetensors", {"w": torch.ones(1)}, {})
    finally:
        os.umask(umask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
