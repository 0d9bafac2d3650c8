"""The data sets ddpm.py trains on: images enter as uint8 (H, W, C) and leave as float (C, H, W)
in [-1, 1], with an integer label (0 where the data has none).

  shapes      10 classes of coloured shapes, drawn here, deterministic from the seed (the demo's data)
  cifar10     CIFAR-10 through torchvision (Krizhevsky 2009), 50,000 training and 10,000 test images
  stl10       STL-10 through torchvision (Coates et al. 2011), 96x96
  a folder    any images, class sub-folders giving labels; 16-bit images scaled, not clipped

and the batches of a step (StepBatchSampler), fixed by (seed, step) alone so a resumed run sees
exactly the batches an uninterrupted one would. Nothing is downloaded where there is no network:
the message says which file to fetch and where to put it.
"""

import contextlib
import math
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

import checkpoints
import files
import messages

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross",
                 "ring", "star", "hbar", "vbar", "ellipse")


def draw_shape(cls, rng, size):
    """One image of class `cls`: a coloured shape on a plain background, drawn 4x and reduced."""
    S = size * 4
    bg = tuple(int(c) for c in rng.integers(0, 110, 3))
    fg = tuple(int(c) for c in rng.integers(140, 256, 3))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    r = S * rng.uniform(0.22, 0.34)
    cx, cy = S / 2 + S * rng.uniform(-0.12, 0.12, 2)
    name = SHAPE_CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif name == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(r / 2.5))
    elif name == "star":
        pts = [(cx + (r if k % 2 == 0 else r / 2.3) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.3) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=fg)
    elif name == "hbar":
        d.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=fg)
    elif name == "vbar":
        d.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=fg)
    elif name == "ellipse":
        d.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=fg)
    return np.asarray(img.resize((size, size), Image.BOX))  # area average: no ringing halo


def to_model_range(images_uint8):
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    x = torch.tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).float()  # a copy: PIL's arrays are read-only
    return x / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    """10 classes of coloured shapes, generated once, deterministic from the seed."""
    classes = SHAPE_CLASSES

    def __init__(self, n=10_000, size=32, seed=0, channels=3, split="train"):
        rng = np.random.default_rng(seed if split == "train" else [seed, 1])  # test: another draw
        self.labels = np.arange(n) % len(SHAPE_CLASSES)
        images = np.stack([draw_shape(c, rng, size) for c in self.labels])  # (N, H, W, 3)
        if channels == 1:  # ITU-R 601 luma, as Pillow's convert("L")
            images = np.round(images @ np.array([0.299, 0.587, 0.114]))[..., None].astype(np.uint8)
        self.images = to_model_range(images)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.images[idx], int(self.labels[idx])


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def to_8bit(img, channels):
    """A Pillow image as 8-bit RGB (channels 3) or L (channels 1). 16-bit images (mode I;16 or I)
    are scaled by 255/65535; a plain convert() would clip them to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point images (mode F) have no defined range")
    return img.convert("RGB" if channels == 3 else "L")


def center_crop_resize(img, size, channels=3):
    """Shorter side to `size`, then the central size x size square; (H, W, C) uint8 array."""
    img = to_8bit(img, channels)
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).reshape(size, size, channels)


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of images; class sub-folders give labels, a flat folder gives label 0."""

    def __init__(self, root, size, channels=3):
        if not os.path.isdir(root):
            raise ValueError(f"--data '{root}' is neither a built-in dataset (shapes, cifar10, "
                             "stl10) nor a folder")
        self.size, self.channels = size, channels
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = subdirs
        candidates = []
        for label, sub in enumerate(subdirs or [""]):
            folder = os.path.join(root, sub)
            for dirpath, _, files in sorted(os.walk(folder)):
                if not subdirs and dirpath != folder:
                    continue
                candidates += [(os.path.join(dirpath, f), label) for f in sorted(files)]
        self.items, unreadable, others = [], [], 0
        for path, label in candidates:
            if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
                others += 1
            elif not os.path.isfile(path):  # a FIFO named x.png would block the open forever
                unreadable.append(f"'{os.path.relpath(path, root)}' (not a regular file)")
            elif not _opens(path):
                unreadable.append(f"'{os.path.relpath(path, root)}' (not a readable image)")
            else:
                self.items.append((path, label))
        self.skipped = others + len(unreadable)
        if not self.items:
            raise ValueError(f"no readable images in '{root}' ({self.skipped} other files skipped)")
        if self.skipped:
            named = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
            messages.say(f"data: skipped {self.skipped} files in '{root}' that are not readable images"
                         + (f": {named}" if named else ""))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        """The image at idx; one whose data turns out corrupt when decoded (the header check at
        start-up cannot see that) is named on stderr and replaced by the next readable one."""
        for k in range(len(self.items)):
            path, label = self.items[(idx + k) % len(self.items)]
            try:
                with Image.open(path) as img:
                    arr = center_crop_resize(img, self.size, self.channels)
                return to_model_range(arr[None])[0], label
            except (OSError, ValueError, SyntaxError) as e:
                messages.warn(f"skipping unreadable image '{path}' ({type(e).__name__}: {e})", "data")
        raise ValueError(f"none of the {len(self.items)} images can be decoded")


def _opens(path):
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


class TorchvisionImages(torch.utils.data.Dataset):
    """CIFAR-10 / STL-10 through torchvision, mapped to [-1, 1] at this boundary."""

    def __init__(self, base, size, channels=3):
        self.base, self.size, self.channels = base, size, channels
        self.classes = base.classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, idx):
        img, label = self.base[idx]
        return to_model_range(center_crop_resize(img, self.size, self.channels)[None])[0], int(label)


DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"),
    "stl10": ("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "stl10_binary.tar.gz"),
}


def load_dataset(cfg, split="train", labelled=False):
    """The training images (split 'train'), or the held-out ones ('test': CIFAR-10's 10,000 test
    images, STL-10's 8,000, another draw of shapes). A folder is its own split. labelled: only
    images with a label (STL-10's 5,000 labelled training images instead of train+unlabeled)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}'; use train or test")
    if cfg.data == "shapes":
        return ShapesDataset(size=cfg.image_size, seed=cfg.seed, channels=cfg.in_channels, split=split)
    if cfg.data in DOWNLOADS:
        import torchvision
        url, filename = DOWNLOADS[cfg.data]
        created = files.missing_folders(cfg.data_dir)  # the folders a download would create
        try:
            with contextlib.redirect_stdout(sys.stderr):
                if cfg.data == "cifar10":
                    base = torchvision.datasets.CIFAR10(cfg.data_dir, train=split == "train",
                                                        download=True)
                else:
                    base = torchvision.datasets.STL10(
                        cfg.data_dir, split="test" if split == "test" else
                        "train" if labelled else "train+unlabeled",
                        download=True)
        except Exception as e:
            files.remove_empty(created)  # a failed download leaves no empty folders behind
            raise ValueError(
                f"{cfg.data} is not in '{cfg.data_dir}' and could not be downloaded "
                f"({type(e).__name__}: {str(e)[:120]}). Download {url} and put the file at "
                f"{os.path.join(cfg.data_dir, filename)}, then run again.") from None
        return TorchvisionImages(base, cfg.image_size, cfg.in_channels)
    return ImageFolderDataset(cfg.data, cfg.image_size, cfg.in_channels)


def class_names(dataset, data):
    """The names of the dataset's classes, in label order; ValueError if it has no labels."""
    names = tuple(str(c) for c in getattr(dataset, "classes", ()))
    if len(names) < 2:
        raise ValueError(f"--data {data} has no class labels (a folder gives them by its class "
                         "sub-folders, at least 2); --cond and train-classifier need them")
    return names


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches determined by (seed, step) alone, so a resumed run sees the same batches. Of the
    batch, process `rank` of `world` gets the rank-th of world equal parts."""

    def __init__(self, n, batch_size, seed, start_step, steps, rank=0, world=1):
        assert n >= batch_size and batch_size % world == 0
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps = start_step, steps
        self.part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def __len__(self):
        return self.steps - self.start_step

    def __iter__(self):
        per_epoch = self.n // self.batch_size  # drop_last
        epoch, perm = -1, None
        for step in range(self.start_step, self.steps):
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm = torch.randperm(self.n, generator=g)
            k = step % per_epoch
            yield perm[k * self.batch_size:(k + 1) * self.batch_size][self.part].tolist()


def step_loader(dataset, cfg, step, rank, world, device):
    """The DataLoader of a run from `step` on: this process's share of each step's batch (see
    StepBatchSampler). Data in memory needs no worker processes; files to decode do, shared by
    a node's processes (up to 8 each). Workers leave Ctrl-C and SIGTERM to the main process."""
    if cfg.num_workers >= 0:
        workers = cfg.num_workers
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        workers = 0 if isinstance(dataset, ShapesDataset) else min(8, max(1, (os.cpu_count() or 1) // per_node))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, step,
                                                cfg.steps, rank, world),
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        worker_init_fn=checkpoints.ignore_stop_signals, generator=torch.Generator().manual_seed(cfg.seed))
