import pytest
import torch

from prefixlens.serialization import atomic_write_text, load_tensors, save_tensors


def test_round_trip_and_metadata(tmp_path):
    path = save_tensors(tmp_path / "a" / "x.safetensors", {"w": torch.arange(3.0)}, {"k": "v"})
    tensors, meta = load_tensors(path)
    assert torch.equal(tensors["w"], torch.arange(3.0)) and meta["k"] == "v"


@pytest.mark.wrong_types_on_purpose  # a str where tensors are annotated, an int where metadata strings are
def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"w": torch.ones(2)}, {})
    with pytest.raises(TypeError, match="not tensors"):
        save_tensors(path, {"w": "not a tensor"}, {})
    with pytest.raises(TypeError):  # raised by safetensors inside the atomic write: metadata must be strings
        save_tensors(path, {"w": torch.zeros(3)}, {"k": 1})
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


# ---- issue 14, items 11 and 20: checksums, and writing through a symlink ---------------------------------
def test_checksum_is_stored_and_a_flipped_byte_is_refused(tmp_path):
    import hashlib

    from prefixlens.serialization import CHECKSUM_KEY, CorruptFileError

    path = save_tensors(tmp_path / "x.safetensors", {"w": torch.arange(6.0).reshape(2, 3)}, {"k": "v"})
    _, meta = load_tensors(path)
    h = hashlib.sha256()  # the documented definition, computed independently
    h.update(b"tensor:w:torch.float32:(2, 3);" + torch.arange(6.0).numpy().tobytes() + b"meta:k='v';")
    assert meta[CHECKSUM_KEY] == h.hexdigest()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="x.safetensors is corrupt"):
        load_tensors(path)


@pytest.mark.parametrize("writer", ["save_tensors", "atomic_write_text", "Prefix.save"])
def test_writing_to_a_symlink_writes_through_it(tmp_path, writer):
    import os

    real = tmp_path / "store" / "real.bin"
    real.parent.mkdir()
    link = tmp_path / "link.bin"
    link.symlink_to(os.path.relpath(real, tmp_path))

    def write(value):
        if writer == "save_tensors":
            save_tensors(link, {"w": torch.full((2,), float(value))}, {})
        elif writer == "atomic_write_text":
            atomic_write_text(link, f"v{value}")
        else:
            import prefixlens as pl
            from tests.conftest import build

            pl.SoftPrompt(torch.full((1, 32), float(value)), pl.signature_of(build("gpt2"))).save(link)

    def read(path):
        if writer == "atomic_write_text":
            return path.read_text()
        return float(load_tensors(path)[0]["w" if writer == "save_tensors" else "embeddings"].flatten()[0])

    write(1)  # a dangling link: the target is created
    real.chmod(0o640)
    write(2)
    assert link.is_symlink() and read(link) == read(real) == ("v2" if writer == "atomic_write_text" else 2.0)
    assert real.stat().st_mode & 0o777 == 0o640, "an existing file keeps its permissions"
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.bin"] and sorted(
        p.name for p in tmp_path.iterdir()) == ["link.bin", "store"], "no temporary file is left behind"


def test_writing_onto_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_tensors(tmp_path / "d", {"w": torch.ones(1)}, {})
    assert list((tmp_path / "d").iterdir()) == []
