"""Data loading: local folders first, checked atomic downloads, clear offline errors."""
import hashlib
import urllib.error

import pytest
import torch

from sparse_tutorial import data


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No data folder, an empty cache, and a network that is down."""
    monkeypatch.setenv("SPARSE_TUTORIAL_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("SPARSE_TUTORIAL_CACHE", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    return tmp_path


def test_offline_without_data_gives_one_clear_error(offline_env):
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_tiny_shakespeare()
    msg = str(err.value)
    assert "input.txt" in msg
    assert data.TINY_SHAKESPEARE_URL in msg
    assert "SPARSE_TUTORIAL_DATA" in msg
    assert not any((offline_env / "cache").rglob("*.*")), "an offline failure left files behind"


def test_corrupt_download_leaves_nothing_behind(tmp_path, monkeypatch):
    source = tmp_path / "served.txt"
    source.write_bytes(b"not the file you are looking for")
    dest = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    with pytest.raises(data.DataUnavailableError, match="MD5"):
        data.download(source.as_uri(), dest, md5=data.TINY_SHAKESPEARE_MD5)
    assert not dest.exists()
    assert not dest.parent.exists(), "a temporary file or the folder made for it was left behind"


def test_interrupted_download_leaves_nothing_behind(tmp_path, monkeypatch):
    class Broken:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n):
            raise ConnectionResetError("connection reset mid-transfer")

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Broken())
    dest = tmp_path / "cache" / "x.txt"
    with pytest.raises(data.DataUnavailableError, match="connection reset"):
        data.download("https://example.invalid/x.txt", dest, md5="0" * 32)
    assert not dest.parent.exists(), "a temporary file or the folder made for it was left behind"


def test_good_download_is_checked_and_renamed_into_place(tmp_path):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    source = tmp_path / "served.txt"
    source.write_bytes(payload)
    dest = tmp_path / "cache" / "input.txt"
    out = data.download(source.as_uri(), dest, md5=hashlib.md5(payload).hexdigest())
    assert out == dest and dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]


def test_cache_folder_is_used_when_data_dir_lacks_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_TUTORIAL_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("SPARSE_TUTORIAL_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("abc abc\n")
    assert data.tiny_shakespeare_path() == cached


def test_char_vocab_round_trip_and_unknown_characters():
    vocab = data.CharVocab("hello world")
    assert len(vocab) == 8
    assert vocab.decode(vocab.encode("low hero")) == "low hero"
    assert vocab.decode(torch.tensor(vocab.encode("old"))) == "old"
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("zebra")


def test_tiny_shakespeare_split_and_batches(shared_data):
    d = data.load_tiny_shakespeare()
    assert len(d.vocab) == 65
    total = len(d.train) + len(d.val)
    assert total == 1115394
    assert abs(len(d.val) / total - 0.1) < 1e-4
    x, y = d.get_batch("train", 4, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="split='test'"):
        d.get_batch("test", 4, 16)


def test_fashion_mnist_loads_offline_from_the_data_folder(shared_data):
    if not (shared_data / "FashionMNIST" / "raw").is_dir():
        pytest.skip("no Fashion-MNIST in the offline data folder")
    train_loader, test_loader = data.image_loaders("fashion-mnist", batch_size=32, train_subset=64,
                                                   test_subset=50)
    x, y = next(iter(train_loader))
    assert x.shape == (32, 1, 28, 28) and y.shape == (32,)
    assert len(test_loader.dataset) == 50


def test_unknown_image_dataset_is_rejected():
    with pytest.raises(ValueError, match="name='cifar'"):
        data.image_datasets("cifar")


def test_image_data_offline_error_names_the_variable(offline_env, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    with pytest.raises(data.DataUnavailableError, match="SPARSE_TUTORIAL_DATA"):
        data.image_datasets("mnist")


def test_offline_errors_name_the_folder_the_variable_pointed_at(offline_env, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("unreachable")))
    folder = str(offline_env / "nothing-here")
    for load in (data.load_tiny_shakespeare, lambda: data.image_datasets("mnist")):
        with pytest.raises(data.DataUnavailableError) as err:
            load()
        assert f"SPARSE_TUTORIAL_DATA={folder}" in str(err.value)


def test_failed_downloads_leave_no_empty_folders(offline_env, monkeypatch):
    import torchvision.datasets.mnist as tv_mnist

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("unreachable")))
    for load in (data.load_tiny_shakespeare, lambda: data.image_datasets("mnist")):
        with pytest.raises(data.DataUnavailableError):
            load()
        assert not (offline_env / "cache").exists(), sorted((offline_env / "cache").rglob("*"))


def test_a_folder_of_torchvision_gz_files_is_found_and_unpacked(tmp_path, monkeypatch):
    import gzip

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 3
    files = {"train-images-idx3-ubyte": bytes([0, 0, 8, 3]) + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
             + bytes(range(256))[: 28] * 28 * n,
             "train-labels-idx1-ubyte": bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes([1, 2, 3])}
    files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"] = files["train-images-idx3-ubyte"], \
        files["train-labels-idx1-ubyte"]
    for name, payload in files.items():
        (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
    monkeypatch.setenv("SPARSE_TUTORIAL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SPARSE_TUTORIAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    train, test = data.image_datasets("mnist")
    assert len(train) == len(test) == n and train[1][1] == 2
    assert sorted(p.name for p in (tmp_path / "data" / "MNIST" / "raw").iterdir()) == sorted(f"{k}.gz" for k in files)


def test_fetch_downloads_each_data_set_checked_into_one_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    payload = b"To be, or not to be\n"
    source = tmp_path / "served.txt"
    source.write_bytes(payload)
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", source.as_uri())
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_MD5", hashlib.md5(payload).hexdigest())
    calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", lambda **kw: calls.append(kw))
    out = data.fetch(tmp_path / "d")
    assert (out / "tinyshakespeare" / "input.txt").read_bytes() == payload
    assert [(c["root"], c["train"], c["download"]) for c in calls] == [(str(out), True, True), (str(out), False, True)]
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_MD5", "0" * 32)   # a changed checksum: the file is fetched again
    with pytest.raises(data.DataUnavailableError, match="MD5"):
        data.fetch(tmp_path / "d")
