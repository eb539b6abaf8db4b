"""The fast input path (decoded cache + device crop-resize) against the PIL reference.

docs/methods.md#input-pipeline states what must hold: for a given crop box and flip, the
two paths give the same image within one uint8 level; the boxes follow torchvision's
``RandomResizedCrop`` distribution; every image mode a dataset holds decodes as before;
and the augmentation of a sample depends on (seed, epoch, position) alone, so a resumed
run with persistent DataLoader workers ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

import dmlkit.data.decoded as decoded_module
from dmlkit.data import get_dataset
from dmlkit.data.crops import Box, collate, random_resized_box, resize_crops
from dmlkit.data.decoded import decoded_images
from dmlkit.data.errors import DatasetError
from dmlkit.data.images import decode_image
from dmlkit.data.transforms import ImagenetTransform
from dmlkit.samplers import PKBatchSampler, SampleKey
from dmlkit.train import TrainConfig, fit
from tests.fixtures_datasets import make_folder, write_image_modes

DECODE = functools.partial(decode_image, "modes")
MEAN = torch.tensor(ImagenetTransform(True).mean).view(-1, 1, 1)
STD = torch.tensor(ImagenetTransform(True).std).view(-1, 1, 1)


def cached(paths, cache_dir, resize=None, processes=None):
    """The decoded cache of ``paths`` (the test protocol's Resize(256)), built if missing."""
    resize = resize or ImagenetTransform(False).resize
    return decoded_images(
        "modes",
        "test",
        paths,
        DECODE,
        resize,
        "Resize(256)",
        cache_dir=cache_dir,
        processes=processes,
        progress=False,
    )


def levels(image: torch.Tensor) -> torch.Tensor:
    """A normalised (3, S, S) image back in uint8 levels (0…255, float)."""
    return (image * STD + MEAN) * 255


def photo(height: int, width: int, seed: int) -> Image.Image:
    """A smooth random RGB image with edges: blurred noise plus a few hard rectangles."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    pixels = np.array(image)
    for _ in range(4):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 4, left : left + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------- same images


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(300, 400), (256, 256), (512, 200), (90, 130)])
def test_device_resize_equals_the_pil_reference_within_one_level(shape, train):
    # Pillow resizes in two passes (columns, then rows) with a uint8 rounding after each:
    # at most ½ level from the first, carried through the second pass's convex weights,
    # plus ½ from the last, and its 22-bit fixed-point weights add ~1e-4. The device path
    # is float32 without rounding, so |difference| ≤ 1 level (+1e-3 for float error).
    transform = ImagenetTransform(train)
    for seed in range(6):
        image = photo(*shape, seed)
        reference = transform(image, np.random.default_rng(seed))
        pixels = np.asarray(transform.resize(image))
        crop = transform.crop(pixels, np.random.default_rng(seed))  # the same box and flip
        assert torch.equal(crop.finish(), reference)  # on the host: Pillow, the same code
        fast = on_device(crop)
        assert fast.shape == reference.shape == (3, 224, 224)
        difference = (levels(fast) - levels(reference)).abs()
        assert difference.max() <= 1.001, (seed, float(difference.max()))
        assert difference.mean() < 0.4  # rounding, not a shifted or mirrored image


def on_device(crop) -> torch.Tensor:
    """One crop finished as the training device does it (here on the CPU)."""
    return collate([(crop, 0)])[0].to("cpu")[0]


def test_a_flip_mirrors_the_crop_and_a_batch_finishes_each_crop_alone():
    transform = ImagenetTransform(True)
    crops = [
        transform.crop(np.asarray(transform.resize(photo(260, 340, s))), np.random.default_rng(s))
        for s in range(5)
    ]
    batch, labels = collate([(crop, i) for i, crop in enumerate(crops)])
    images = batch.to("cpu")
    assert images.shape == (5, 3, 224, 224) and labels.tolist() == [0, 1, 2, 3, 4]
    for image, crop in zip(images, crops, strict=True):  # padding never leaks in
        torch.testing.assert_close(image, on_device(crop), rtol=0, atol=1e-5)
    pixels = torch.from_numpy(crops[0].pixels.copy())[None]
    sizes = torch.tensor([crops[0].pixels.shape[:2]])
    plain = resize_crops(pixels, sizes, torch.tensor([False]), 224)
    flipped = resize_crops(pixels, sizes, torch.tensor([True]), 224)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=1e-5)


def test_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    height, width, draws = 256, 341, 4000
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_box(height, width, rng) for _ in range(draws)])
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    theirs = np.array(
        [RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(draws)]
    )
    statistics = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log ratio": lambda b: np.log(b[:, 3] / b[:, 2]),
        "top": lambda b: b[:, 0] / height,
        "left": lambda b: b[:, 1] / width,
    }
    for name, statistic in statistics.items():
        result = scipy.stats.ks_2samp(statistic(ours), statistic(theirs))
        assert result.pvalue > 1e-3, (name, result)
    # An image too thin for any try falls back to torchvision's clamped centre box.
    thin = torch.empty(3, 10, 400)
    expected = RandomResizedCrop.get_params(thin, (0.08, 1.0), (3 / 4, 4 / 3))
    assert random_resized_box(10, 400, rng) == Box(*expected) == Box(0, 193, 10, 13)


# ---------------------------------------------------------------- the decoded cache


def test_every_image_mode_decodes_through_the_cache_as_through_pil(tmp_path):
    files = write_image_modes(tmp_path / "images", size=40)
    paths = [str(path) for path, _ in files.values()]
    transform = ImagenetTransform(False)
    cache = cached(paths, tmp_path / "cache")
    for i, (name, (path, expected)) in enumerate(files.items()):
        np.testing.assert_array_equal(np.asarray(decode_image("modes", str(path))), expected)
        resized = np.asarray(transform.resize(Image.fromarray(expected)))
        np.testing.assert_array_equal(cache[i], resized, err_msg=name)


def test_the_cache_is_reused_rebuilt_when_a_file_changes_and_never_left_half_built(
    tmp_path, monkeypatch
):
    files = write_image_modes(tmp_path / "images")
    paths = [str(path) for path, _ in files.values()]

    def build():
        return cached(paths, tmp_path / "cache", processes=2)

    first = build()
    monkeypatch.setattr(decoded_module, "_build", lambda *a: pytest.fail("rebuilt"))
    assert build().folder == first.folder  # reused
    monkeypatch.undo()
    os.utime(paths[0], ns=(1, 1))  # a replaced file: new size or modification time

    def broken(image):
        raise KeyboardInterrupt  # killed mid-build

    with pytest.raises(KeyboardInterrupt):
        cached(paths, tmp_path / "cache", resize=broken, processes=1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [
        first.folder.name
    ]
    assert build().folder != first.folder


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/<class>/<k>.jpg: 6 classes × 4 JPEGs (3 training, 3 test classes)."""
    return make_folder(tmp_path / "tree", [f"class{c}" for c in range(6)], images_per_class=4)


def test_skip_bad_images_through_the_cache_substitutes_as_the_pil_path_does(tmp_path, tree):
    train = get_dataset("folder", "train", root=tree)
    victim = 5
    Path(train.paths[victim]).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    options = dict(root=tree, transform="test", skip_bad_images=True)
    pil = get_dataset("folder", "train", **options)
    cached = get_dataset(
        "folder", "train", decoded_cache=True, cache_dir=tmp_path / "cache", **options
    )
    assert cached.decoded.bad().tolist() == [victim]
    for index in (victim, victim + 1):
        assert torch.equal(cached[index][0], pil[index][0])  # finished by Pillow: the same
    assert cached.bad_images == pil.bad_images == [train.paths[victim]]
    strict = get_dataset(
        "folder",
        "train",
        root=tree,
        transform="test",
        decoded_cache=True,
        cache_dir=tmp_path / "cache",
    )
    with pytest.raises(DatasetError, match="cannot decode image") as info:
        strict[victim]
    assert train.paths[victim] in str(info.value)


# ---------------------------------------------------------------- same draws everywhere


def test_ddp_ranks_draw_the_augmentations_of_the_single_process_run():
    labels = np.repeat(np.arange(6), 4)
    single = list(PKBatchSampler(labels, 2, 2, seed=3, num_batches=4, keys=True))
    ranks = [
        list(PKBatchSampler(labels, 2, 2, seed=3, num_batches=4, rank=r, world_size=2, keys=True))
        for r in range(2)
    ]
    assert [ranks[0][0], ranks[1][0], ranks[0][1], ranks[1][1]] == single
    positions = [key.position for batch in single for key in batch]
    assert positions == list(range(16))
    a, b = SampleKey(7, 3, 1, 5).rng().random(4), SampleKey(7, 3, 1, 5).rng().random(4)
    assert np.array_equal(a, b) and not np.array_equal(a, SampleKey(7, 3, 2, 5).rng().random(4))


def tree_config(tree: Path, out_dir: Path, cache: Path, **overrides) -> TrainConfig:
    values = dict(
        dataset="folder",
        data_root=str(tree),
        backbone="glyphnet",
        embedding_dim=8,
        p=3,
        k=2,
        num_batches=2,
        epochs=2,
        eval_ks=(1,),
        batch_size_eval=8,
        num_workers=2,
        progress=False,
        seed=0,
        out_dir=str(out_dir),
        dataset_options={"decoded_cache": True, "cache_dir": str(cache)},
    )
    values.update(overrides)
    return TrainConfig(**values)


class Crash(RuntimeError):
    pass


def test_a_resumed_run_with_persistent_workers_ends_bit_for_bit_as_an_uninterrupted_one(
    tmp_path, tree
):
    reference = fit(tree_config(tree, tmp_path / "reference", tmp_path / "cache"))

    def crash(epoch, step):
        if (epoch, step) == (1, 1):
            raise Crash

    cfg = tree_config(tree, tmp_path / "crashed", tmp_path / "cache")
    with pytest.raises(Crash):
        fit(cfg, on_step=crash)
    resumed = fit(dataclasses.replace(cfg, resume=True))
    assert resumed.metrics == reference.metrics
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------- on CUDA (gpu_session.sh)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_crop_resize_equals_the_cpu_one():
    transform = ImagenetTransform(True)
    crops = [
        transform.crop(np.asarray(transform.resize(photo(300, 420, s))), np.random.default_rng(s))
        for s in range(8)
    ]
    batch, _ = collate([(crop, 0) for crop in crops])
    on_cuda = batch.pin_memory().to("cuda", memory_format=torch.channels_last)
    torch.testing.assert_close(on_cuda.cpu(), batch.to("cpu"), rtol=0, atol=1e-4)


@needs_cuda
def test_cuda_fit_from_the_cache_resumes_bit_for_bit(tmp_path, tree):
    overrides = dict(device="cuda", amp="bf16", channels_last=True)
    reference = fit(tree_config(tree, tmp_path / "reference", tmp_path / "cache", **overrides))

    def crash(epoch, step):
        if (epoch, step) == (1, 0):
            raise Crash

    cfg = tree_config(tree, tmp_path / "crashed", tmp_path / "cache", **overrides)
    with pytest.raises(Crash):
        fit(cfg, on_step=crash)
    resumed = fit(dataclasses.replace(cfg, resume=True))
    assert resumed.metrics == reference.metrics


def test_a_damaged_or_unwritable_cache_is_one_clear_error(tmp_path):
    files = write_image_modes(tmp_path / "images")
    paths = [str(path) for path, _ in files.values()]

    def build(cache):
        return cached(paths, cache, processes=1)

    entry = build(tmp_path / "cache").folder
    with open(entry / "pixels.u8", "r+b") as pixels:
        pixels.truncate(1000)
    with pytest.raises(DatasetError, match="damaged after it was built; delete"):
        build(tmp_path / "cache")
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")  # mkdir under it fails, also for root
    with pytest.raises(OSError, match="cannot build the decoded-image cache .* decoded_cache=Fa"):
        build(not_a_folder / "cache")
