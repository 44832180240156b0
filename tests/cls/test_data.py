"""Data: batched augmentation equals torchvision's per-image transforms exactly; digits; CIFAR-100 files."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from kd_cls.engine import get_cfg
from kd_cls.data import get_dataset_info
from kd_cls.data.batch_aug import BatchAugment, DeviceLoader
from kd_cls.data.transforms import make_test_transform

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _reference(img_hwc: np.ndarray, i: int, j: int, flip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4) at (i, j), RandomHorizontalFlip, ToTensor, Normalize."""
    pil = TF.pad(Image.fromarray(img_hwc), 4, fill=0)
    pil = TF.crop(pil, i, j, 32, 32)
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), CIFAR_MEAN, CIFAR_STD)


def test_batch_augment_is_bit_identical_to_torchvision():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=g)
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [3, 5], [4, 4]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = BatchAugment(CIFAR_MEAN, CIFAR_STD)(images, offsets, flips)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    for n in range(6):
        ref = _reference(images[n].numpy(), int(offsets[n, 0]), int(offsets[n, 1]), bool(flips[n]))
        assert torch.equal(out[n], ref), f"sample {n} differs"


def test_batch_augment_random_params_cover_the_crop_range():
    aug = BatchAugment(CIFAR_MEAN, CIFAR_STD)
    offsets, flips = aug.sample_params(4000, 32, torch.Generator().manual_seed(1))
    assert offsets.min().item() == 0 and offsets.max().item() == 8  # 40 - 32 positions, inclusive
    assert 0.45 < flips.float().mean().item() < 0.55


def test_test_pipeline_equals_totensor_normalize():
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    out = BatchAugment(CIFAR_MEAN, CIFAR_STD).normalize(images)
    tt = make_test_transform(CIFAR_MEAN, CIFAR_STD)
    for n in range(3):
        assert torch.equal(out[n], tt(Image.fromarray(images[n].numpy())))


def test_device_loader_epochs_cover_data_once_and_shard_across_ranks():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 32, 32, 3).contiguous()
    y = torch.arange(10)
    aug = BatchAugment((0, 0, 0), (1, 1, 1))
    loader = DeviceLoader(x, y, 4, aug, aug, shuffle=True, with_index=True, seed=3)
    loader.set_epoch(1)
    seen = torch.cat([b[2] for b in loader])
    assert sorted(seen.tolist()) == list(range(10)) and len(loader) == 3
    for img, target, index in loader:
        assert torch.equal(target, index)  # labels travel with their images
    loader.set_epoch(1)
    again = torch.cat([b[2] for b in loader])
    assert torch.equal(seen, again)  # same epoch, same order (exact resume)
    loader.set_epoch(2)
    assert not torch.equal(seen, torch.cat([b[2] for b in loader]))
    shards = []
    for r in range(2):
        lr = DeviceLoader(x, y, 2, aug, aug, shuffle=True, with_index=True, seed=3, rank=r, world_size=2)
        lr.set_epoch(1)
        shards.append(torch.cat([b[2] for b in lr]).tolist())
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))


def _bilinear_up4(img8: np.ndarray) -> np.ndarray:
    """8x8 -> 32x32 bilinear with half-pixel centres (align_corners=False), by hand."""
    src = np.clip((np.arange(32) + 0.5) / 4 - 0.5, 0, None)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, 7)
    w = src - i0
    rows = img8[i0] * (1 - w)[:, None] + img8[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_digits_dataset():
    from sklearn.datasets import load_digits

    from kd_cls.data.digits import MEAN, NUM_TRAIN, STD, load_digits_split

    xtr, ytr, xte, yte = load_digits_split()
    info = get_dataset_info("digits")
    assert (info.num_classes, info.num_train, info.image_size, info.model_family) == (10, NUM_TRAIN, 32, "cifar")
    assert len(xtr) == NUM_TRAIN == 1437 and len(xte) == 360
    assert xtr.shape[1:] == (32, 32, 3) and xtr.dtype == np.uint8
    assert (xtr[..., 0] == xtr[..., 2]).all()
    # stratified 80/20: each class's test count is 20% of its total, to within one image
    raw = load_digits()
    for c in range(10):
        total = int((raw.target == c).sum())
        assert abs(int((yte == c).sum()) - 0.2 * total) <= 1
    # each image is its 8x8 original scaled by 1/16, bilinearly upsampled, as uint8
    from sklearn.model_selection import train_test_split

    tr, _ = train_test_split(np.arange(len(raw.images)), test_size=0.2, stratify=raw.target, random_state=0)
    assert np.array_equal(ytr, raw.target[tr])
    for n in range(0, len(tr), 97):
        expected = np.round(_bilinear_up4(raw.images[tr[n]] / 16.0) * 255)
        assert np.abs(expected - xtr[n, :, :, 0]).max() <= 1
    # documented normalization makes the training split zero-mean, unit-variance
    f = xtr[..., 0].astype(np.float64) / 255
    assert abs((f.mean() - MEAN[0]) / STD[0]) < 1e-3 and abs(f.std() / STD[0] - 1) < 1e-3


def test_digits_loaders_and_subset():
    cfg = get_cfg()
    cfg.merge_from_list(["DATASET.TYPE", "digits", "DATASET.SUBSET", 40, "SOLVER.BATCH_SIZE", 16])
    train, val, num_data, num_classes = get_dataset_info("digits").build(cfg, False)
    assert (num_data, num_classes, len(train), len(val)) == (40, 10, 3, 1)
    image, target, index = next(iter(train))
    assert image.shape == (16, 3, 32, 32) and target.dtype == torch.int64 and index.shape == (16,)


def _write_fake_cifar(root, n_train=5, n_test=3):
    from kd_cls.testing import write_cifar100

    return write_cifar100(root, n_train, n_test)


def test_cifar100_missing_is_a_clear_error(in_tmp_cwd):
    cfg = get_cfg()
    with pytest.raises(FileNotFoundError) as e:
        get_dataset_info("cifar100").build(cfg, False)
    msg = str(e.value)
    assert "cifar-100-python" in msg and "cifar-100-python.tar.gz" in msg and "./data" in msg and "\n" not in msg


def test_cifar100_reads_python_format(in_tmp_cwd):
    folder = _write_fake_cifar(str(in_tmp_cwd / "data"))
    from kd_cls.data.cifar100 import load_cifar100

    x, y = load_cifar100("./data", "test")
    with open(os.path.join(folder, "test"), "rb") as f:
        raw = pickle.load(f)["data"]
    # rows are R plane, G plane, B plane of 32x32 each
    assert x.shape == (3, 32, 32, 3) and np.array_equal(x[1, :, :, 2], raw[1, 2048:].reshape(32, 32))
    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.BATCH_SIZE", 4, "DATASET.TEST.BATCH_SIZE", 8])
    train, val, num_data, num_classes = get_dataset_info("cifar100").build(cfg, False)
    assert (num_data, num_classes) == (5, 100)
    image, target = next(iter(val))
    ref = make_test_transform(CIFAR_MEAN, CIFAR_STD)(Image.fromarray(x[0]))
    assert torch.equal(image[0], ref) and target.tolist() == [0, 1, 2]
