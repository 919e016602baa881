"""ImageFolder batches decoded and augmented on the device (datamodules/device_decode.py) against
torchvision's PIL transforms, which the worker path uses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from netcompress.datamodules import ImageFolderDataModule
from netcompress.datamodules.device_decode import draw_views
from netcompress.datamodules.tensor_loader import epoch_seed

SIZE, RESIZE = 32, 36


def smooth_tree(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """train/ and val/ of JPEGs with various sizes and smooth content (JPEG-friendly, like photos)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(40, 90, 2))
                coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
                Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    return root


def module(root: Path, decode: str, **kw) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(root, batch_size=4, num_workers=0, image_size=SIZE, resize_size=RESIZE, decode=decode,
                               **kw)
    dm.setup()
    return dm


def torchvision_draws(shapes, seed: int) -> list:
    """The reference: RandomResizedCrop.get_params and a flip per image on the global RNG seeded with ``seed``."""
    torch.manual_seed(seed)
    return [(tuple(RandomResizedCrop.get_params(torch.zeros(3, *shape), [0.08, 1.0], [3 / 4, 4 / 3])),
             bool(torch.rand(1) < 0.5)) for shape in shapes]


def test_views_are_torchvisions_draws_from_a_private_generator():
    """Same seed, same boxes and flips as torchvision on the global RNG, which is left as it was."""
    shapes = [(375, 500), (50, 400), (400, 20), (32, 32)] * 50
    torch.manual_seed(123)
    before = torch.get_rng_state()
    g = torch.Generator().manual_seed(7)
    drawn = draw_views(shapes[:100], g) + draw_views(shapes[100:], g)  # the generator advances across calls
    assert torch.equal(torch.get_rng_state(), before)
    assert drawn == torchvision_draws(shapes, 7)


def test_eval_batches_match_the_pil_path(tmp_path):
    """Resize + CenterCrop on decoded tensors vs PIL in the workers: same images, same order, pixels within
    about one grey level (two bilinear resamplers and two JPEG decoders)."""
    root = smooth_tree(tmp_path)
    pil, device = module(root, "workers"), module(root, "device")
    for split in ("val_dataloader", "test_dataloader"):
        (xa, ya), (xb, yb) = (torch.cat(parts) for parts in zip(*getattr(pil, split)())), \
            (torch.cat(parts) for parts in zip(*getattr(device, split)()))
        assert xb.shape == xa.shape == (8, 3, SIZE, SIZE) and torch.equal(ya, yb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        pixel = 1 / 255 / min(pil.std)  # one grey level in normalised units
        assert (xa - xb).abs().mean() < 0.5 * pixel and (xa - xb).abs().max() < 3 * pixel


def test_train_batches_are_the_seeded_crops_of_the_pil_transforms(tmp_path):
    """Each training image is RandomResizedCrop + flip with the box and flip drawn from (seed, epoch):
    rebuilt here with torchvision's PIL functions from the same draws."""
    root = smooth_tree(tmp_path)
    dm = module(root, "device", seed=3)
    loader = dm.train_dataloader()
    order = loader.indices(0)
    (x, y), *_ = list(loader)
    files = dm.train_set.samples
    images = [Image.open(files[index][0]).convert("RGB") for index in order[:4]]
    draws = torchvision_draws([(image.height, image.width) for image in images], epoch_seed(3, 0) ^ 0x5EED)
    for position, (index, image, ((top, left, h, w), flip)) in enumerate(zip(order, images, draws)):
        target = files[index][1]
        view = TF.resized_crop(image, top, left, h, w, [SIZE, SIZE], antialias=True)
        if flip:
            view = TF.hflip(view)
        expected = TF.normalize(TF.to_tensor(view), dm.mean, dm.std)
        assert y[position] == target
        assert (x[position] - expected).abs().mean() < 2 / 255 / min(dm.std)


def test_epochs_are_a_function_of_seed_and_epoch_and_ranks_split_them(tmp_path):
    root = smooth_tree(tmp_path, per_class=6)
    first, again = module(root, "device", seed=1).train_dataloader(), module(root, "device", seed=1).train_dataloader()
    a, b = [torch.cat([x for x, _ in loader]) for loader in (first, again)]
    assert torch.equal(a, b)
    assert not torch.equal(torch.cat([x for x, _ in first]), a)  # the next epoch: new order and crops
    loader = module(root, "device", seed=1).train_dataloader()
    ranks = []
    for rank in (0, 1):
        loader.rank, loader.world_size = rank, 2
        ranks.append(set(loader.indices(5)))
    assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1]) == 6
    assert len(loader) == 6 // 4


def test_a_file_nothing_decodes_is_named_and_a_png_under_a_jpg_name_is_decoded(tmp_path):
    root = smooth_tree(tmp_path)
    png = root / "val" / "a" / "0.jpg"
    Image.open(png).save(png, format="PNG")  # PNG bytes under a .jpg name: the batched JPEG decode fails
    xs = torch.cat([x for x, _ in module(root, "device").val_dataloader()])
    assert xs.shape == (8, 3, SIZE, SIZE) and torch.isfinite(xs).all()
    broken = root / "val" / "b" / "1.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"data\.root: cannot decode image .*1\.jpg"):
        list(module(root, "device").val_dataloader())


def test_decode_setting_is_checked_and_auto_stays_on_the_workers_without_cuda(tmp_path):
    root = smooth_tree(tmp_path)
    with pytest.raises(ValueError, match=r"`data\.decode` must be one of workers, device, auto; got 'gpu'"):
        ImageFolderDataModule(root, decode="gpu")
    assert not module(root, "auto").decodes_on_device()  # no trainer: the CPU, so PIL in the workers
    assert module(root, "device").decodes_on_device()
