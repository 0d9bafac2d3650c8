"""Pictures, in numpy and Pillow: samples as uint8 images and grids, the reverse process as a still
or an animation (x_t beside the predicted x_0), and the loss curve; each written atomically.
"""

import math
import os

import numpy as np
from PIL import Image, ImageDraw

import files

PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROGRESS_EXTENSIONS = (".png", ".gif", ".webp")


def to_uint8(x, source=None):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, clipping what the sampler overshoots. x: a
    numpy array, or a torch tensor (on any device, of any float dtype). source: the model file the
    samples came from; then samples that are not finite are a ValueError, not black pictures."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if source is not None and not np.isfinite(x).all():
        raise ValueError(f"the samples of '{source}' are not finite (NaN or inf): its weights are, or a "
                         "setting (--amp fp16?) overflowed; nothing was written")
    x = np.clip(x, -1, 1)
    return np.round((x + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def grid_of(images_uint8, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> (rows, columns, C) uint8, the images on a white background."""
    n, h, w, c = images_uint8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_uint8[k]
    return grid


def save_picture(images, path, **options):
    """A Pillow image (or a list of them: the frames of an animation) written atomically: to a
    temp file in the format the extension names, then renamed over `path`."""
    frames = images if isinstance(images, list) else [images]
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:])
    files.write_atomically(path, lambda tmp: frames[0].save(tmp, format=fmt, **options))


def pil_image(image_uint8):
    """(H, W, C) uint8 -> a Pillow image, grayscale for C = 1."""
    return Image.fromarray(image_uint8.squeeze(-1) if image_uint8.shape[-1] == 1 else image_uint8)


def save_grid(images_uint8, path, nrow=None, pad=2):
    """(N, H, W, C) uint8 -> one picture, nrow images per row (default: a square)."""
    save_picture(pil_image(grid_of(images_uint8, nrow, pad)), path)


def progress_steps(n_steps, animation):
    """Which steps a process picture shows: 10 evenly spaced for a still, up to 100 for an
    animation; the first step is always in, the sample itself is added after them."""
    return sorted(set(np.linspace(0, n_steps - 1, min(n_steps, 100 if animation else 10)).round().astype(int)))


def save_progress(frames, final, path):
    """The reverse process as a picture. frames: [(t, x_t, pred_x0)], both (N, H, W, C) uint8;
    final: the samples. A .png is a still: one row per image (up to 8), for each frame a pair of
    columns x_t | predicted x_0, then the sample. A .gif or .webp is an animation: per frame, the
    x_t of up to 16 images on the left and their predicted x_0 on the right, labelled with t."""
    n, h, w, c = final.shape
    zoom = max(1, 64 // h)  # small images enlarged (nearest), so a 32x32 sample is visible
    pad, label = 2, 12
    H, W = h * zoom, w * zoom
    columns = [(f"t={t}", x, p) for t, x, p in frames] + [("sample", final, final)]
    if os.path.splitext(path)[1].lower() == ".png":
        rows = min(n, 8)
        sheet = np.full((label + rows * (H + pad), len(columns) * (2 * W + 3 * pad), 3), 255, np.uint8)
        for j, (_, x, p) in enumerate(columns):
            left = j * (2 * W + 3 * pad)
            for r in range(rows):
                top = label + r * (H + pad)
                sheet[top:top + H, left:left + W] = enlarged(x[r], zoom)
                sheet[top:top + H, left + W + pad:left + 2 * W + pad] = enlarged(p[r], zoom)
        image = Image.fromarray(sheet)
        draw = ImageDraw.Draw(image)
        for j, (text, _, _) in enumerate(columns):
            draw.text((j * (2 * W + 3 * pad), 0), text, fill=(0, 0, 0))
        save_picture(image, path)
        return
    shown = min(n, 16)
    pictures = []
    for text, x, p in columns:
        left, right = tiles(x[:shown], zoom, pad), tiles(p[:shown], zoom, pad)
        frame = np.full((label + left.shape[0], 2 * left.shape[1] + 4 * pad, 3), 255, np.uint8)
        frame[label:, :left.shape[1]] = left
        frame[label:, left.shape[1] + 4 * pad:] = right
        image = Image.fromarray(frame)
        ImageDraw.Draw(image).text((0, 0), f"{text}: x_t | predicted x_0", fill=(0, 0, 0))
        pictures.append(image)
    durations = [60] * (len(pictures) - 1) + [1500]  # hold the samples
    lossless = {"lossless": True} if path.lower().endswith(".webp") else {}
    save_picture(pictures, path, duration=durations, loop=0, **lossless)


def enlarged(image, zoom):
    """(H, W, C) uint8 -> (zoom H, zoom W, 3), nearest-neighbour, grayscale as RGB."""
    image = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    return image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)


def tiles(images, zoom, pad):
    """(N, H, W, C) uint8 enlarged on a square of ceil(sqrt(N)) x ceil(sqrt(N)) cells."""
    n, h, w, _ = images.shape
    side, H, W = math.ceil(math.sqrt(n)), h * zoom, w * zoom
    grid = np.full((side * (H + pad), side * (W + pad), 3), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, side)
        grid[r * (H + pad):r * (H + pad) + H, q * (W + pad):q * (W + pad) + W] = enlarged(images[k], zoom)
    return grid


class ProcessFrames:
    """The (t, x_t, pred_x0) of the first batch at the steps that the --progress pictures show,
    for a chain of n_steps: a sampler's callback(k, t, x_t, pred_x0); set `done` after the first
    batch. `save` draws every picture once the samples are known."""

    def __init__(self, paths, n_steps):
        self.shown = {path: progress_steps(n_steps, not path.lower().endswith(".png")) for path in paths}
        self.wanted = set().union(*self.shown.values())
        self.frames, self.done = {}, False

    def wants(self, k):
        return not self.done and k in self.wanted

    def __call__(self, k, t, x_t, pred_x0):
        """Step k's network time t, and x_t and the predicted x_0 as (N, C, H, W) in [-1, 1]."""
        if self.wants(k):
            self.frames[k] = (int(t), to_uint8(x_t), to_uint8(pred_x0))

    def save(self, final):
        for path, steps in self.shown.items():
            save_progress([self.frames[k] for k in steps], final, path)


def save_loss_curve(rows, png_path, width=640, height=360):
    """Loss vs step from the log rows, drawn with Pillow (log-scale loss)."""
    if len(rows) < 2:
        return
    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.log10(np.array([max(r["loss"], 1e-8) for r in rows]))
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    m = 50
    x0, x1, y0, y1 = steps.min(), steps.max(), loss.min(), loss.max()
    y1 = y1 if y1 > y0 else y0 + 1
    pts = [(m + (s - x0) / max(x1 - x0, 1) * (width - 2 * m),
            height - m - (v - y0) / (y1 - y0) * (height - 2 * m)) for s, v in zip(steps, loss)]
    d.rectangle([m, m, width - m, height - m], outline="black")
    d.line(pts, fill=(200, 40, 40), width=2)
    d.text((m, 10), "training loss (L_simple, log scale)", fill="black")
    d.text((m, height - m + 5), f"step {int(x0)}", fill="black")
    d.text((width - m - 90, height - m + 5), f"step {int(x1)}", fill="black")
    d.text((5, m - 15), f"{10 ** y1:.4f}", fill="black")
    d.text((5, height - m), f"{10 ** y0:.4f}", fill="black")
    save_picture(img, png_path)
