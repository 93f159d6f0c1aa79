import pickle
import urllib.error

import numpy as np
import pytest
from PIL import Image

from utils.data import DataError, balanced_subset, load_data, load_image_folder
from conftest import COLOURS, write_fake_cifar10, write_image_folder


def test_image_folder_reads_every_image(image_folder):
    train, test = load_image_folder(image_folder)
    assert train.classes == sorted(COLOURS) == test.classes
    assert train.images.shape == (36, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (12, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [12, 12, 12]
    # labels follow the folders: the red class has the highest mean red channel
    red = train.classes.index("red")
    assert train.images[train.labels == red][..., 0].mean() > 150
    # pixels are the file's pixels, unchanged
    first = np.asarray(Image.open(image_folder / "train" / "blue" / "000.png"))
    assert np.array_equal(train.images[0], first)


def test_image_folder_resizes_converts_and_skips_other_files(tmp_path):
    root = write_image_folder(tmp_path, train_per_class=1, test_per_class=1)
    Image.new("L", (64, 48), 200).save(root / "train" / "red" / "big_grey.jpg")
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    train, _ = load_image_folder(root)
    assert train.images.shape == (4, 32, 32, 3)
    big = train.images[train.labels == train.classes.index("red")][-1]  # sorted after 000.png
    assert abs(int(big.mean()) - 200) <= 2  # grey, resized, three channels


def test_load_data_picks_image_folder(image_folder):
    train, _ = load_data(image_folder)
    assert len(train.labels) == 36


def test_balanced_subset_is_balanced_and_fixed_by_seed():
    labels = np.repeat(np.arange(10), 50)
    idx = balanced_subset(labels, 100, seed=3)
    assert np.bincount(labels[idx]).tolist() == [10] * 10
    assert len(set(idx)) == 100
    assert np.array_equal(idx, balanced_subset(labels, 100, seed=3))
    assert not np.array_equal(idx, balanced_subset(labels, 100, seed=4))
    assert np.bincount(labels[balanced_subset(labels, 15, seed=0)]).tolist() == [2] * 5 + [1] * 5
    with pytest.raises(ValueError, match="501 of 500"):
        balanced_subset(labels, 501, seed=0)


def test_cifar10_download_failure_says_where_to_put_the_archive(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError) as err:
        load_data(tmp_path / "empty")
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "empty") in message
    assert "\n" not in message


def test_cifar10_pickles_are_read_through_torchvision(tmp_path, monkeypatch):
    """The torchvision path, on fake batches in CIFAR-10's pickle format."""
    folder = write_fake_cifar10(tmp_path)
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # md5s of the real files
    train, test = load_data(tmp_path)
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    assert train.classes == list("abcdefghij") and test.labels.tolist() == [0, 1, 2, 3]
    # CHW pickle rows become HWC images
    raw = pickle.loads((folder / "test_batch").read_bytes())["data"][0]
    assert np.array_equal(test.images[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_an_epoch_never_reads_files(image_folder):
    """Images are decoded once: the loader still yields them after the files are gone."""
    import shutil

    from utils.data import ArrayDataset, test_transform as eval_transform

    train, _ = load_image_folder(image_folder)
    shutil.rmtree(image_folder)
    images = [x for x, _ in ArrayDataset(train.images, train.labels, eval_transform())]
    assert len(images) == 36 and images[0].shape == (3, 32, 32)


def test_parallel_decode_matches_serial_and_names_a_bad_file(image_folder, monkeypatch):
    import utils.data
    serial, _ = load_image_folder(image_folder)
    monkeypatch.setattr(utils.data, "PARALLEL_DECODE_MIN", 1)
    monkeypatch.setattr(utils.data, "DECODE_CHUNK", 5)  # several chunks, the last one short
    monkeypatch.setattr(utils.data.os, "cpu_count", lambda: 2)
    parallel, _ = load_image_folder(image_folder)
    assert np.array_equal(parallel.images, serial.images)
    assert np.array_equal(parallel.labels, serial.labels)
    bad = image_folder / "train" / "green" / "005.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the worker's DataError reaches the caller
    with pytest.raises(DataError, match="005.png.*delete or replace the file"):
        load_image_folder(image_folder)


def test_a_class_folder_lists_its_images_in_sorted_order_without_hidden_files_or_linked_folders(tmp_path):
    from utils.data import _image_files
    folder = tmp_path / "cat"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt", ".DS_Store", "._b.png", "sub/.hidden.png"):
        (folder / name).write_bytes(b"x")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "d.png").write_bytes(b"x")
    (tmp_path / "elsewhere" / "e.png").write_bytes(b"x")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # not entered
    (folder / "f.png").symlink_to(tmp_path / "elsewhere" / "e.png")  # a linked file is an image
    (folder / "g.png").symlink_to(tmp_path / "missing.png")  # a broken link is not
    (folder / "h.png").mkdir()  # nor is a folder named like an image
    expected = sorted(folder / name for name in ("a.JPG", "b.png", "f.png", "sub/c.png"))
    assert _image_files(folder) == [str(p) for p in expected]
