"""Measure what a model learned, the way published numbers are computed.

  python evaluate.py fid --ckpt ckpt.pt --n 50000 --ref cifar10-train     # sample, then FID, IS, KID
  python evaluate.py fid --onnx ddpm.onnx --n 50000 --ref cifar10-train   # the samples from ONNX Runtime
  python evaluate.py fid samples/ cifar10-train                          # a folder of PNGs against a reference
  python evaluate.py fid samples_a/ samples_b/                            # or two folders, or a .npz
  python evaluate.py shapes runs/demo/samples.png                          # the built-in shapes' judge
  python evaluate.py nll --ckpt ckpt.pt --data cifar10 --split test        # the bound in bits/dim

FID, Inception Score and KID come from torch-fidelity: its port of the TensorFlow Inception-v3
graph of 2015-12-05 that Heusel et al.'s FID code and Salimans et al.'s Inception Score code use
(the same weights, TF1's bilinear resize to 299x299, 2048-d pool features for FID and KID,
the 1008 unbiased logits for IS), which its authors report matches the TensorFlow numbers to
within a fraction of a percent. The protocol of Ho et al. (FID 3.17, IS 9.46 on CIFAR-10): 50,000
samples from the EMA weights against the statistics of the 50,000 training images.

Reference statistics are computed once and cached as .npz (mu, sigma: pytorch-fid's keys, and up
to 10,000 features for KID). Samples are written as numbered PNGs while they are made, so an
interrupted run continues where it stopped and gives the same images. Nothing is downloaded
unless asked for: without the Inception weights it says which file to fetch and where to put
it (or pass --inception-weights PATH).
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import tempfile

import schedules

REFERENCES = ("cifar10-train", "cifar10-test", "stl10-train", "shapes")


def parser():
    """evaluate.py's commands and their flags."""
    top = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fid", help="FID, Inception Score and KID")
    p.add_argument("inputs", nargs="*", metavar="SET",
                   help="a folder of images, then a folder, .npz or reference name to compare with "
                        "(default: none; use --ckpt or --onnx to sample instead)")
    p.add_argument("--ckpt", default=None, help="sample from this checkpoint's EMA weights (default: none)")
    p.add_argument("--onnx", default=None, help="sample from this exported model with ONNX Runtime (default: none)")
    p.add_argument("--ref", default=None,
                   help=f"the reference: {', '.join(REFERENCES)}, a folder or a .npz (default: the last SET)")
    p.add_argument("--n", type=int, default=50_000, help="samples to make (default: 50000, as papers)")
    p.add_argument("--batch", type=int, default=250, help="images per sampling batch (default: 250)")
    p.add_argument("--sampler", choices=schedules.SAMPLERS, default=None, help="(default: ddpm; a distilled model: ddim)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: T; a distilled model: the steps it was distilled for)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default: 0)")
    p.add_argument("--spacing", choices=schedules.SPACINGS, default=None,
                   help="the t's of a respaced chain, as for sampling (default: trailing for dpm++, "
                        "leading otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default: 0)")
    p.add_argument("--class", dest="classes", default=None, metavar="K",
                   help="a conditional model's classes, sampled in turn: all, names or indices (default: "
                        "none, unconditional)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale with --class (default: 3; a distilled model: its own)")
    p.add_argument("--samples", default=None,
                   help="folder for the samples, resumable (default: runs/eval/<model>-<sampler>-<steps>)")
    p.add_argument("--stats-dir", default=os.path.join("data", "fid_stats"),
                   help="where reference statistics are cached (default: data/fid_stats)")
    p.add_argument("--data-dir", default="data", help="where cifar10 / stl10 are found (default: data)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch's "
                        "hub cache, downloaded once if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"],
                   help="ONNX Runtime provider for --onnx (default: auto)")
    p.add_argument("--json", default=None, help="also write the numbers here (default: none)")

    q = sub.add_parser("nll", help="negative log-likelihood: the variational bound in bits/dim")
    q.add_argument("--ckpt", required=True, help="the checkpoint (its EMA weights)")
    q.add_argument("--data", default=None,
                   help="shapes, cifar10, stl10 or a folder of images (default: the checkpoint's data)")
    q.add_argument("--data-dir", default="data", help="where cifar10 / stl10 are found (default: data)")
    q.add_argument("--split", choices=["train", "test"], default="test",
                   help="cifar10's and stl10's test set or a fresh draw of shapes (default: test; a "
                        "folder is its own split)")
    q.add_argument("--n", type=int, default=None, help="images to evaluate (default: the whole split)")
    q.add_argument("--batch", type=int, default=64, help="images per batch (default: 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the x_t draws (default: 0)")
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    q.add_argument("--json", default=None, help="also write the numbers here (default: none)")

    s = sub.add_parser("shapes", help="judge samples of the built-in shapes: one clean shape per image?")
    s.add_argument("images", help="a grid picture (as sample writes) or a folder of images")
    s.add_argument("--cell", type=int, default=32, help="image size inside a grid (default: 32)")
    s.add_argument("--cache-dir", default=os.path.join("data", "judge"),
                   help="where the judge's classifier is kept after its first training (default: data/judge)")
    s.add_argument("--json", default=None, help="also write the scores here (default: none)")
    s.add_argument("--class", dest="classes", default=None, metavar="K",
                   help="the classes the images were sampled for, as sample's --class (all: a grid row "
                        "per class); also reports how many the judge finds of that class (default: none)")
    return top


if __name__ == "__main__":  # --help and a malformed flag are answered before torch loads (seconds)
    parser().parse_args()

import numpy as np
import torch
from PIL import Image

import data
import ddpm
import distributed
import files
import messages
import pictures
import sampling

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
KID_FEATURES = 10_000  # reference features kept in the .npz for KID (it uses subsets of 1,000)
IMAGE_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------
# Inception features (torch-fidelity)


def default_inception_weights():
    """Where torch-fidelity's own download would put the weights (torch's hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))


class Inception:
    """torch-fidelity's TF-compatible Inception-v3: uint8 images in, pool features and logits out."""

    def __init__(self, weights=None, device="cpu", batch=64):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        path = weights or default_inception_weights()
        if not os.path.isfile(path):
            if weights:
                raise ValueError(f"--inception-weights '{weights}' does not exist")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=True)
            except Exception as e:
                raise ValueError(
                    f"the Inception weights are not at '{path}' and could not be downloaded "
                    f"({type(e).__name__}). Download {INCEPTION_URL} (91 MB) and put it there, or "
                    "pass --inception-weights PATH") from None
        try:  # weights only: torch-fidelity itself unpickles the file, which could run its code
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
                raise ValueError("not a dict of tensors")
        except Exception as e:
            raise ValueError(f"'{path}' cannot be read as weights alone ({type(e).__name__}); it is not "
                             "torch-fidelity's Inception-v3 weights, or it holds code, which is never run") from None
        try:
            with tempfile.TemporaryDirectory() as folder:  # tensors only, re-saved: safe to unpickle
                torch.save(state, os.path.join(folder, "inception.pth"))
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                       feature_extractor_weights_path=os.path.join(folder, "inception.pth"))
            self.net = self.net.to(device)
        except Exception as e:
            raise ValueError(f"'{path}' is not torch-fidelity's Inception-v3 weights "
                             f"({type(e).__name__}: {str(e)[:150]})") from None
        self.device, self.batch = device, batch

    @torch.no_grad()
    def __call__(self, images_uint8):
        """(N, H, W, C) uint8 -> (pool features (N, 2048), logits (N, 1008)), float64 numpy."""
        pool, logits = [], []
        for start in range(0, len(images_uint8), self.batch):
            x = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + self.batch]))
            x = x.permute(0, 3, 1, 2)
            if x.shape[1] == 1:  # grayscale: the same value in R, G and B
                x = x.repeat(1, 3, 1, 1)
            f, l = self.net(x.to(self.device))
            pool.append(f.double().cpu().numpy())
            logits.append(l.double().cpu().numpy())
        return np.concatenate(pool), np.concatenate(logits)


# ----------------------------------------------------------------------------------------------
# The metrics (torch-fidelity's definitions)


def frechet_distance(stats_a, stats_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) (Heusel et al. 2017)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    a = {"mu": np.asarray(stats_a["mu"], np.float64), "sigma": np.asarray(stats_a["sigma"], np.float64)}
    b = {"mu": np.asarray(stats_b["mu"], np.float64), "sigma": np.asarray(stats_b["sigma"], np.float64)}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"the two sets have features of {a['mu'].shape[0]} and {b['mu'].shape[0]} "
                         "dimensions; both must come from the same Inception layer")
    return fid_statistics_to_metric(a, b, verbose=False)["frechet_inception_distance"]


def statistics(features):
    """mu and sigma of the features (float64), and up to KID_FEATURES of them (a fixed draw)."""
    keep = np.random.default_rng(0).permutation(len(features))[:KID_FEATURES]
    return {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False),
            "features": features[np.sort(keep)].astype(np.float32), "n": len(features)}


def inception_score(logits, splits=10):
    """exp E_x KL(p(y|x) || p(y)) over `splits` shuffled splits (Salimans et al. 2016): mean, std."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    out = isc_features_to_metric(torch.from_numpy(logits), splits=min(splits, len(logits)))
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_inception_distance(features_a, features_b):
    """Squared MMD with the cubic polynomial kernel, 100 subsets (Binkowski et al. 2018): mean, std."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    size = min(1000, len(features_a), len(features_b))
    out = kid_features_to_metric(torch.from_numpy(np.asarray(features_a, np.float64)),
                                 torch.from_numpy(np.asarray(features_b, np.float64)),
                                 kid_subsets=100, kid_subset_size=size, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


# ----------------------------------------------------------------------------------------------
# Image sets: folders, built-in references, samples from a checkpoint or an ONNX file


def image_files(folder):
    paths = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_FILES))
    if not paths:
        raise ValueError(f"'{folder}' holds no images ({', '.join(IMAGE_FILES)})")
    return paths


def read_images(paths):
    """(N, H, W, 3) uint8; every image must have the size of the first."""
    images = []
    for f in paths:
        try:
            with Image.open(f) as img:
                images.append(np.asarray(data.to_8bit(img, 3)))  # 16-bit scaled, not clipped to white
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"'{f}' cannot be read as an image ({e})") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"'{f}' is {images[-1].shape[1]}x{images[-1].shape[0]}, the others "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; FID compares sets of one size")
    return np.stack(images)


def reference_images(name, data_dir):
    """A built-in reference set as (N, H, W, 3) uint8."""
    if name == "shapes":
        images = data.ShapesDataset(seed=12345).images  # not the training draw (seed 0)
        return pictures.to_uint8(images)
    import torchvision
    dataset, split = name.split("-")
    url, filename = data.DOWNLOADS[dataset]
    try:
        if dataset == "cifar10":
            base = torchvision.datasets.CIFAR10(data_dir, train=split == "train", download=True)
            return np.asarray(base.data)
        base = torchvision.datasets.STL10(data_dir, split="train", download=True)
        return np.asarray(base.data).transpose(0, 2, 3, 1)
    except Exception as e:
        raise ValueError(f"{dataset} is not in '{data_dir}' and could not be downloaded "
                         f"({type(e).__name__}). Download {url} and put the file at "
                         f"{os.path.join(data_dir, filename)}, then run again") from None


def reference_statistics(ref, inception, stats_dir, data_dir):
    """Statistics of --ref (a built-in name, a folder, or a .npz), cached in stats_dir."""
    if ref.endswith(".npz"):
        return load_statistics(ref)
    if ref in REFERENCES:
        key = ref
    else:  # a folder, keyed by its path and its files (names, sizes, times): a changed folder is new
        listing = "".join(f"{f}:{os.path.getsize(f)}:{os.path.getmtime(f)};" for f in image_files(ref))
        key = (f"{os.path.basename(os.path.normpath(ref))}-"
               f"{hashlib.sha1((os.path.abspath(ref) + listing).encode()).hexdigest()[:12]}")
    cache = os.path.join(stats_dir, f"{key}-inception.npz")
    if os.path.isfile(cache):
        messages.say(f"reference: {ref}, statistics cached in {cache}")
        return load_statistics(cache)
    files.check_writable_folder(stats_dir, "--stats-dir")  # a folder that cannot be: said before any work
    images = reference_images(ref, data_dir) if ref in REFERENCES else read_images(image_files(ref))
    messages.say(f"reference: {ref}, {len(images)} images; computing its Inception statistics once")
    stats = statistics(inception(images)[0])
    try:
        save_npz(cache, stats)
        messages.say(f"reference statistics cached in {cache}")
    except files.WriteFailed as e:  # a disk that filled: the statistics are computed, the FID goes on
        messages.warn(f"{e}: the reference statistics are not cached, so the next run computes them again")
    return stats


def save_npz(path, stats):
    """The statistics as a .npz, written atomically (errors raised before the rename)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **stats)
    files.write_atomically(path, write)


def json_text(result):
    """JSON of a result with the numbers that are not finite as null (JSON has no NaN)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return json.dumps(clean(result), indent=1, allow_nan=False)


def load_statistics(path):
    try:
        with np.load(path) as f:
            stats = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}' cannot be read as a .npz of statistics ({e})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"'{path}' has no mu and sigma (the keys pytorch-fid and this script write)")
    return stats


def file_digest(path):
    """sha256 of a file's bytes: what a set of samples was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_to_folder(folder, n, batch, make_batch, made_from=None):
    """n samples as numbered PNGs in folder, made batch by batch by make_batch(start, size) ->
    (size, H, W, C) uint8, which must depend on start alone (a fixed seed per batch): an
    interrupted run finds the PNGs already there and continues, with the same images. made_from
    (the model's digest and the settings) is kept in the folder's source.json: samples made
    from anything else are never reused."""
    from tqdm import tqdm
    files.check_writable_folder(folder, "--samples")
    source = os.path.join(folder, "source.json")
    existing = os.path.isdir(folder) and any(f.lower().endswith(IMAGE_FILES) for f in os.listdir(folder))
    if made_from is not None and existing:
        try:
            with open(source) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != made_from:
            raise ValueError(f"'{folder}' holds samples of another model or other settings (its source.json "
                             "says what they were made from); pass another --samples folder, or empty it")
    if made_from is not None:
        files.write_text(source, json.dumps(made_from, indent=1))
    done = 0
    while done < n and os.path.isfile(os.path.join(folder, f"{done:05d}.png")):
        done += 1
    start = done - done % batch  # a batch is made whole or not at all
    if done:
        messages.say(f"samples: {done} of {n} already in {folder}; continuing")
    bar = tqdm(total=n, initial=start, desc="sampling", unit="img", dynamic_ncols=True)
    for first in range(start, n, batch):
        size = min(batch, n - first)
        for k, img in enumerate(make_batch(first, size)):
            path = os.path.join(folder, f"{first + k:05d}.png")
            files.write_atomically(path, lambda tmp: Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
                                   .save(tmp, format="PNG"))
        bar.update(size)
    bar.close()
    return [os.path.join(folder, f"{k:05d}.png") for k in range(n)]


def sample_labels(classes, names, source):
    """The classes of a conditional model's samples, cycled through (class-balanced, as papers
    sample), from --class's text; None (unconditional) without --class."""
    if classes is None:
        if names:
            messages.warn(f"'{source}' is class-conditional and no --class was given: sampled unconditionally "
                          "(the 'no label' model); --class all samples every class in turn", "note")
        return None
    if not names:
        raise ValueError(f"--class: '{source}' is an unconditional model (trained without --cond)")
    return sampling.parse_classes(classes, names)


def torch_batches(ckpt, sampler, seed, device, classes=None, guidance=None):
    """(make_batch for sample_to_folder from a checkpoint (EMA weights) and a schedules.Sampler,
    on `device`, and the sampler and guidance it uses: a distilled model's own, sampling.distilled_*);
    with classes, image i is of class classes[i % len(classes)], guided with scale `guidance`."""
    device = distributed.pick_device(device)
    model, cfg = ddpm.load_checkpoint(ckpt)
    model.to(device)
    sampler = sampling.distilled_sampler(cfg.distilled_steps, sampler)
    guidance, shown = sampling.distilled_guidance(cfg.distilled_guidance, guidance, cfg.num_classes > 0, classes)
    sampling.check_sampler(sampler, cfg.T)
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    labels = sample_labels(classes, cfg.class_names, ckpt)

    def make_batch(start, size):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        x_T = torch.randn(size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
        y = None if labels is None else torch.tensor([labels[(start + k) % len(labels)] for k in range(size)])
        x0 = ddpm.sample_loop(model, diffusion, x_T, sampler, noise_fn=ddpm.GaussianNoise(g),
                              guidance=ddpm.Guidance(y, guidance))
        return pictures.to_uint8(x0, source=ckpt)
    return make_batch, (sampler, shown)


def onnx_batches(path, sampler, seed, provider, classes=None, guidance=None):
    """make_batch for sample_to_folder from an exported model, through ONNX Runtime (each step's
    noise from numpy, seeded per batch as torch_batches seeds x_T), and its settings; classes
    as torch_batches."""
    import sample_ort
    (denoiser, step, meta, device), (sampler, guidance, shown) = sample_ort.open_for_sampling(
        path, sampler, guidance, classes, provider)
    guided = classes is not None and guidance not in (0, 1)  # else one branch is enough
    labels = sample_labels(classes, meta["class_names"], path)
    sampling.check_sampler(sampler, len(meta["betas"]))
    timesteps, coefs = schedules.step_table(meta["betas"], sampler, meta["var_type"])
    C, S = meta["in_channels"], meta["image_size"]
    runners = {}

    def make_batch(start, size):
        rng = np.random.default_rng([seed, start])
        runner = runners.setdefault(size, sample_ort.Runner(denoiser, step, (size, C, S, S), device, meta["num_classes"],
                                                            guidance if guided else None, clip_x0=meta["clip_x0"]))
        if labels is not None and guidance != 0:  # guidance 0: the unconditional model
            runner.set_labels([labels[(start + k) % len(labels)] for k in range(size)])
        x_T = rng.standard_normal((size, C, S, S), dtype=np.float32)
        x0 = runner.run(x_T, timesteps, coefs, lambda k, shape: rng.standard_normal(shape, dtype=np.float32))
        return pictures.to_uint8(x0, source=path)
    return make_batch, (sampler, shown)


# ----------------------------------------------------------------------------------------------
# The judge of the built-in shapes (the demo's measure)


def judge_shapes(images_uint8, classifier):
    """Per image, whether it is one clean shape of the dataset: the background (the median of the
    border pixels) in the data's range 0..110 and flat, the shape's pixels (those far from the
    background) in 140..255 and flat, one connected shape of plausible size, and the classifier
    sure of a class. Returns a dict of boolean arrays, 'good' being all of them."""
    x = images_uint8.astype(np.float64)
    n, h, w, _ = x.shape
    border = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (N, P, 3)
    bg = np.median(border, axis=1)  # (N, 3)
    dist = np.abs(x - bg[:, None, None, :]).max(axis=3)  # (N, H, W)
    fg = dist > 60
    out = {"background in range": np.all((bg >= 0) & (bg <= 110 + 8), axis=1),
           "background flat": (np.abs(border - bg[:, None]).max(axis=2) < 25).mean(axis=1) > 0.9}
    size, connected, fg_range, fg_flat = [], [], [], []
    for k in range(n):
        pixels = x[k][fg[k]]
        area = fg[k].mean()
        size.append(0.04 < area < 0.6)
        connected.append(largest_component(fg[k]) >= 0.95 * max(fg[k].sum(), 1))
        inner = x[k][inner_mask(fg[k])]
        colour = np.median(pixels, axis=0) if len(pixels) else np.zeros(3)
        fg_range.append(bool(np.all(colour >= 140 - 8)))
        fg_flat.append(len(inner) > 0 and np.percentile(np.abs(inner - colour).max(axis=1), 90) < 30)
    out.update({"shape of plausible size": np.array(size), "one connected shape": np.array(connected),
                "shape colour in range": np.array(fg_range), "shape flat": np.array(fg_flat)})
    probs = classifier(images_uint8)
    out["classifier sure"] = probs.max(axis=1) > 0.9
    out["class"] = probs.argmax(axis=1)
    out["good"] = np.all([v for k, v in out.items() if k != "class"], axis=0)
    return out


def largest_component(mask):
    """Pixels in the largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best = 0
    h, w = mask.shape
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        stack, count = [(i, j)], 0
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            count += 1
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < h and 0 <= d < w and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        best = max(best, count)
    return best


def inner_mask(mask):
    """The mask without its edge pixels (anti-aliased edges are neither shape nor background)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


class ShapesClassifier(torch.nn.Module):
    """A small CNN that names the shape class of a 32x32 image (trained by train_shapes_classifier)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(64, len(data.SHAPE_CLASSES)))

    @torch.no_grad()
    def __call__(self, images_uint8):
        x = data.to_model_range(images_uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] != 32:
            x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True)
        return torch.softmax(self.net.eval()(x), dim=1).numpy()


def train_shapes_classifier(n=20_000, steps=600, seed=1):
    """The judge's classifier, trained on a fresh draw of shapes (not the training set's seed).
    About 30 s on 2 CPU cores; accuracy on another draw printed."""
    torch.manual_seed(seed)
    shapes = data.ShapesDataset(n=n, size=32, seed=seed + 100)
    model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    labels = torch.from_numpy(shapes.labels)
    for step in range(steps):
        idx = torch.randint(0, n, (128,))
        loss = torch.nn.functional.cross_entropy(model.net.train()(shapes.images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = data.ShapesDataset(n=1000, size=32, seed=seed + 200)
    accuracy = (model(pictures.to_uint8(test.images)).argmax(1) == test.labels).mean()
    return model, float(accuracy)


def shapes_judge(cache_dir, n=20_000, steps=600, seed=1):
    """The judge's classifier, trained once and kept in cache_dir (weights only, keyed by how it
    was trained); a cache that is missing, unreadable or of other settings is trained again."""
    path = os.path.join(cache_dir, f"shapes_judge-{n}-{steps}-{seed}.pt")
    model = ShapesClassifier()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.net.load_state_dict(state["weights"])
        return model, float(state["accuracy"])
    except Exception:  # no cache yet, or one that cannot serve: train (about 30 s)
        pass
    model, accuracy = train_shapes_classifier(n, steps, seed)
    try:
        files.write_atomically(path, lambda tmp: torch.save({"weights": model.net.state_dict(), "accuracy": accuracy}, tmp))
    except OSError as e:
        messages.warn(f"cannot keep the judge in '{cache_dir}' ({e.strerror or e}); it is trained again next time")
    return model, accuracy


def split_grid(path, cell, pad=2):
    """The cells of a grid written by save_grid, as (N, cell, cell, C) uint8."""
    if cell < 1:
        raise ValueError(f"--cell {cell}: give the image size inside the grid, in pixels")
    grid = read_images([path])[0]
    rows, cols = (grid.shape[0] - pad) // (cell + pad), (grid.shape[1] - pad) // (cell + pad)
    if rows * (cell + pad) + pad != grid.shape[0] or cols * (cell + pad) + pad != grid.shape[1]:
        raise ValueError(f"'{path}' is not a grid of {cell}x{cell} images (pass --cell)")
    if rows * cols == 0:
        raise ValueError(f"'{path}' is smaller than one {cell}x{cell} cell (pass --cell)")
    cells = [grid[pad + r * (cell + pad):pad + r * (cell + pad) + cell, pad + q * (cell + pad):pad + q * (cell + pad) + cell]
             for r in range(rows) for q in range(cols)]
    return np.stack([c for c in cells if not (c == 255).all()])  # empty cells at the end are white


# ----------------------------------------------------------------------------------------------
# Negative log-likelihood: the variational bound in bits/dim (Ho et al. Table 1)


def negative_log_likelihood(ckpt, data_name=None, data_dir="data", split="test", n=None, batch=64, seed=0,
                            device="auto"):
    """L_VLB of n images of the split in bits/dim, every one of the T terms evaluated per image
    (GaussianDiffusion.bits_per_dim), with the checkpoint's EMA weights. Returns a dict."""
    if n is not None and n < 1:
        raise ValueError(f"--n {n}: evaluate at least 1 image")
    if batch < 1:
        raise ValueError(f"--batch {batch}: use at least 1 image per batch")
    device = distributed.pick_device(device)
    model, cfg = ddpm.load_checkpoint(ckpt)
    model = model.to(device)
    data_cfg = dataclasses.replace(cfg, data=data_name or cfg.data, data_dir=data_dir)
    dataset = data.load_dataset(data_cfg, split)  # no flips: those are the training loop's
    n = len(dataset) if n is None else min(n, len(dataset))
    diffusion = ddpm.GaussianDiffusion.from_config(cfg)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch)
    generator = torch.Generator(device=device).manual_seed(seed)
    totals, priors, terms = [], [], []
    from tqdm import tqdm
    with tqdm(total=n * cfg.T, desc="bits/dim", unit="term", unit_scale=True, dynamic_ncols=True) as bar:
        for x0, _ in loader:
            total, prior, per_t = diffusion.bits_per_dim(model, x0.to(device), generator,
                                                         callback=lambda k, b=len(x0): bar.update(b))
            totals.append(total)
            priors.append(prior)
            terms.append(per_t)
    total, prior, per_t = torch.cat(totals), torch.cat(priors), torch.cat(terms)
    return {"bits_per_dim": float(total.mean()),
            "bits_per_dim_stderr": float(total.std() / math.sqrt(n)) if n > 1 else float("nan"),
            "prior": float(prior.mean()), "decoder": float(per_t[:, 0].mean()),
            "terms": float(per_t[:, 1:].sum(dim=1).mean()), "n_images": n,
            "terms_per_t": per_t.mean(dim=0).tolist(), "data": data_cfg.data, "split": split,
            "var_type": cfg.var_type, "T": cfg.T, "ckpt": ckpt}


# ----------------------------------------------------------------------------------------------
# Command line


def nll_command(args):
    if args.json:
        files.check_output_path(args.json, (".json",), "--json")
    r = negative_log_likelihood(args.ckpt, data_name=args.data, data_dir=args.data_dir, split=args.split,
                                n=args.n, batch=args.batch, seed=args.seed, device=args.device)
    print(f"{r['data']} {r['split']}, {r['n_images']} images, {r['var_type']}: "
          f"{r['bits_per_dim']:.4f} ± {r['bits_per_dim_stderr']:.4f} bits/dim (standard error)")
    print(f"  prior L_T {r['prior']:.6f}   decoder L_0 {r['decoder']:.4f}   "
          f"sum of L_1..L_T-1 {r['terms']:.4f}")
    if args.json:
        files.write_text(args.json, json_text(r))
    return r


def fid_command(args):
    if args.ckpt and args.onnx:
        raise ValueError("give --ckpt or --onnx, not both")
    sampling_from = bool(args.ckpt or args.onnx)
    sets = list(args.inputs) + ([args.ref] if args.ref else [])
    if len(sets) != (1 if sampling_from else 2):
        raise ValueError("give --ckpt or --onnx and a reference (--ref NAME, a folder or a .npz), or "
                         "two sets: a folder of images, then a folder, .npz or reference name")
    reference = sets[-1]
    if not (reference in REFERENCES or os.path.isdir(reference) or
            (reference.endswith(".npz") and os.path.isfile(reference))):
        raise ValueError(f"--ref '{reference}' is neither {', '.join(REFERENCES)}, a folder of images, "
                         "nor an existing .npz of statistics")
    if not sampling_from and not os.path.isdir(sets[0]):
        raise ValueError(f"'{sets[0]}' is not a folder of images")
    if args.n < 2:
        raise ValueError(f"--n {args.n}: FID needs at least 2 samples (papers use 50,000)")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: use at least 1 image per batch")
    if args.json:
        files.check_output_path(args.json, (".json",), "--json")
    result, make_batch = {}, None
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(f"--guidance {args.guidance}: use a number >= 0 (0: unconditional, 1: conditional)")
    sampler = schedules.Sampler(args.sampler, args.steps, args.eta, args.spacing)
    if args.ckpt:  # the model is read first: a sentence about it comes before any download
        make_batch, settings = torch_batches(args.ckpt, sampler, args.seed, args.device, args.classes, args.guidance)
    elif args.onnx:
        make_batch, settings = onnx_batches(args.onnx, sampler, args.seed, args.provider, args.classes, args.guidance)
    inception = Inception(args.inception_weights, distributed.pick_device(args.device))
    if sampling_from:
        name = os.path.splitext(os.path.basename(args.ckpt or args.onnx))[0]
        sampler, args.guidance = settings  # a distilled model's own
        spacing = sampler.spacing or schedules.default_spacing(sampler.name)
        spaced = "" if spacing == "leading" else f"-{spacing}"
        folder = args.samples or os.path.join("runs", "eval", f"{name}-{sampler.name}-{sampler.steps or 'T'}{spaced}")
        made_from = {"model": file_digest(args.ckpt or args.onnx), "sampler": sampler.name, "steps": sampler.steps,
                     "eta": sampler.eta, "spacing": spacing, "seed": args.seed, "class": args.classes,
                     "guidance": args.guidance if args.classes else None}
        paths = sample_to_folder(folder, args.n, args.batch, make_batch, made_from)
        result["samples"] = folder
    else:
        paths = image_files(sets[0])
        result["samples"] = sets[0]
    images = read_images(paths)
    print(f"samples: {len(images)} images of {images.shape[2]}x{images.shape[1]} from {result['samples']}")
    features, logits = inception(images)
    ref = reference_statistics(reference, inception, args.stats_dir, args.data_dir)
    ours = statistics(features)
    result.update(n_samples=len(images), reference=reference, n_reference=int(ref.get("n", -1)))
    result["fid"] = frechet_distance(ours, ref)
    result["inception_score"], result["inception_score_std"] = inception_score(logits)
    if "features" in ref and len(ref["features"]) >= 2:
        result["kid"], result["kid_std"] = kernel_inception_distance(features, ref["features"])
    print(f"FID {result['fid']:.4f}   IS {result['inception_score']:.4f} ± {result['inception_score_std']:.4f}"
          + (f"   KID {result['kid']:.6f} ± {result['kid_std']:.6f}" if "kid" in result else "   (no KID: "
             "the reference .npz holds no features)"))
    if len(images) < 50_000 or result["n_reference"] not in (-1, 50_000):
        print(f"note: {len(images)} samples against {result['n_reference']} reference images; published "
              "CIFAR-10 numbers use 50,000 and the training set's 50,000. FID falls as n grows, so "
              "numbers from other n are not comparable")
    if args.json:
        files.write_text(args.json, json_text(result))
    return result


def shapes_command(args):
    if os.path.isdir(args.images):
        images = read_images(image_files(args.images))
    elif os.path.isfile(args.images):
        images = split_grid(args.images, args.cell)
    else:
        raise ValueError(f"'{args.images}' is neither a grid picture nor a folder of images")
    if args.json:  # before the half minute of training
        files.check_output_path(args.json, (".json",), "--json")
    classifier, accuracy = shapes_judge(args.cache_dir)
    verdict = judge_shapes(images, classifier)
    print(f"judge: classifier accuracy on fresh shapes {accuracy:.3f}")
    for name, ok in verdict.items():
        if name != "class":
            print(f"  {name:<26} {ok.mean():6.1%}")
    counts = np.bincount(verdict["class"][verdict["good"]], minlength=len(data.SHAPE_CLASSES))
    print(f"good cells: {verdict['good'].sum()} of {len(images)} ({verdict['good'].mean():.1%}); classes of the "
          "good ones: " + ", ".join(f"{c} {k}" for c, k in zip(data.SHAPE_CLASSES, counts) if k))
    if args.classes is not None:  # the classes sample --class asked for, in its grid order
        asked, _ = sampling.class_labels(sampling.parse_classes(args.classes, data.SHAPE_CLASSES), len(images))
        if len(asked) != len(images):
            raise ValueError(f"--class {args.classes} gives {len(asked)} cells, the grid has {len(images)}")
        verdict["class asked for"] = verdict["class"] == asked
        print(f"  {'class asked for':<26} {verdict['class asked for'].mean():6.1%} (the judge's class is the "
              "one --class asked for)")
    if args.json:
        summary = {name: float(ok.mean()) for name, ok in verdict.items() if name != "class"}
        summary.update(n_images=len(images), classifier_accuracy=accuracy)
        files.write_text(args.json, json_text(summary))
    return verdict


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        {"fid": fid_command, "nll": nll_command, "shapes": shapes_command}[args.command](args)
    except (ValueError, files.WriteFailed) as e:  # a user's mistake, a full disk: one sentence
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; samples written so far are kept and reused") from None


if __name__ == "__main__":
    main()
