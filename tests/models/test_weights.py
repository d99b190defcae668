import hashlib
import pickle

import pytest
import torch

from aver.models.weights import WEIGHTS, load_state_dict


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_registry_entries_are_complete():
    assert set(WEIGHTS) == {"facenet-vggface2", "densenet201-imagenet", "vggish-audioset"}
    for entry in WEIGHTS.values():
        assert entry.url.startswith("https://") and entry.filename in entry.url
        assert entry.preprocessing
    assert WEIGHTS["densenet201-imagenet"].sha256 == "c1103571"


def test_missing_registry_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AVER_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_state_dict("vggish-audioset")
    assert "curl -L https://github.com/harritaylor/torchvggish" in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_registry_name_resolves_in_weights_dir_and_checks_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("AVER_WEIGHTS_DIR", str(tmp_path))
    torch.save({"w": torch.ones(2)}, tmp_path / "vggish-10086976.pth")
    with pytest.raises(ValueError, match="sha256 mismatch"):  # our file is not the real release
        load_state_dict("vggish-audioset")


def test_full_sha256_verified(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(load_state_dict(str(path), sha256=digest)["w"], torch.arange(3.0))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_state_dict(str(path), sha256="f" * 64)


def test_untrusted_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict(str(path))
    assert not (tmp_path / "PWNED").exists()


def test_load_from_s3(s3, tmp_path):
    import fsspec

    uri = f"s3://{s3['bucket']}/weights/state.pt"
    local = tmp_path / "state.pt"
    torch.save({"w": torch.full((4,), 7.0)}, local)
    with fsspec.open(uri, "wb", **s3["options"]) as f:
        f.write(local.read_bytes())
    state = load_state_dict(uri, storage_options=s3["options"])
    assert torch.equal(state["w"], torch.full((4,), 7.0))
    with pytest.raises(FileNotFoundError, match="s3://aver-test/weights/none.pt"):
        load_state_dict(f"s3://{s3['bucket']}/weights/none.pt", storage_options=s3["options"])



def test_ship_copies_a_checked_registry_file_once_and_passes_uris_through(s3, tmp_path, monkeypatch):
    from aver.models.weights import ship

    monkeypatch.setenv("AVER_WEIGHTS_DIR", str(tmp_path))
    torch.save({"w": torch.full((3,), 5.0)}, tmp_path / WEIGHTS["facenet-vggface2"].filename)
    folder = f"s3://{s3['bucket']}/ship/weights"
    uri = ship("facenet-vggface2", folder, s3["options"])
    assert uri == f"{folder}/{WEIGHTS['facenet-vggface2'].filename}"
    assert torch.equal(load_state_dict(uri, storage_options=s3["options"])["w"], torch.full((3,), 5.0))
    assert ship(uri, folder, s3["options"]) == uri  # a URI is taken as it is
    torch.save({"w": torch.ones(2)}, tmp_path / WEIGHTS["vggish-audioset"].filename)
    with pytest.raises(ValueError, match="sha256 mismatch"):  # checked before it is shipped
        ship("vggish-audioset", folder, s3["options"])
