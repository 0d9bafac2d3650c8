"""What the two sampling commands (ddpm.py sample, sample_ort.py) share, torch-free: the request
(their common flags) and its checks, the sampler checks and a distilled model's own chain and
guidance, class specs (--class), and writing the samples.
"""

import math
import os
from typing import NamedTuple

import numpy as np

import files
import messages
import pictures
import schedules
from schedules import Sampler


class Request(NamedTuple):
    """What a sampling command is asked for: the flags both sampling scripts share (add_sampling_flags),
    with their defaults; the sampler's name None: ddpm, or a distilled model's own."""
    n: int = 64
    sampler: Sampler = Sampler(None)
    seed: int = 0
    batch: int = None
    out: str = "samples.png"
    outdir: str = None
    progress: tuple = ()
    classes: str = None
    guidance: float = None

    @classmethod
    def from_args(cls, args):
        """The request of parsed flags (an argparse.Namespace with add_sampling_flags' names)."""
        sampler = Sampler(args.sampler, args.steps, args.eta, args.spacing)
        return cls(sampler=sampler, **{name: getattr(args, name) for name in cls._fields if name != "sampler"})


def check_request(request, inputs):
    """The checks both sampling scripts make before any work: sizes, the seed, the guidance scale,
    and that every output can be written without destroying an input (the model files `inputs`)
    or another output. Returns the request with its progress paths as a list."""
    n, seed, batch, guidance, out = request.n, request.seed, request.batch, request.guidance, request.out
    if n < 1:
        raise ValueError(f"--n {n}: sample at least 1 image")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"--seed {seed}: use a whole number from 0 to 2^63 - 1")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch {batch}: use at least 1 image per batch")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"--guidance {guidance}: use a number >= 0 (0: unconditional, 1: conditional)")
    files.check_output_path(out, pictures.PICTURE_EXTENSIONS, "--out", inputs=inputs)
    progress = [request.progress] if isinstance(request.progress, str) else list(request.progress or ())
    for k, path in enumerate(progress):
        if os.path.abspath(path) in map(os.path.abspath, [out, *progress[:k]]):
            raise ValueError(f"--progress '{path}' is named twice (also as --out or another --progress)")
        files.check_output_path(path, pictures.PROGRESS_EXTENSIONS, "--progress", inputs=(*inputs, out))
    if request.outdir:
        files.check_writable_folder(request.outdir, "--outdir")
    return request._replace(progress=progress)


def add_sampling_flags(parser):
    """The flags `ddpm.py sample` and `sample_ort.py` share, with one help text each."""
    parser.add_argument("--n", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps; fewer than T respaces the chain (default: T; a distilled "
                             "model: the steps it was distilled for)")
    parser.add_argument("--sampler", choices=schedules.SAMPLERS, default=None,
                        help="ddpm: ancestral (Algorithm 2); ddim: Song et al.; dpm++: DPM-Solver++(2M), "
                             "Lu et al. 2022, good at 10 to 25 steps (default: ddpm; a distilled model: ddim)")
    parser.add_argument("--eta", type=float, default=0.0,
                        help="DDIM noise, 0 deterministic .. 1 (default: 0; ddim only)")
    parser.add_argument("--spacing", choices=schedules.SPACINGS, default=None,
                        help="which t's a chain shorter than T keeps: leading 0, T/steps, ..; trailing "
                             ".., T-1 (Lin et al. 2023) (default: trailing for dpm++, leading otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_T and the noise (default: 0)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per network call (default: all of --n)")
    parser.add_argument("--out", default="samples.png",
                        help="the grid picture, .png/.jpg/.webp/.bmp (default: samples.png)")
    parser.add_argument("--outdir", default=None,
                        help="also write one PNG per image in this folder (default: none)")
    parser.add_argument("--progress", action="append", default=[], metavar="PATH",
                        help="also draw the reverse process: .png, a still (x_t and predicted x_0 at "
                             "10 steps), or .gif/.webp, an animation; may be given more than once "
                             "(default: none)")
    parser.add_argument("--class", dest="classes", default=None, metavar="K",
                        help="class(es) to draw: a name or an index, a comma list, or all (a grid row "
                             "per class); needs a class-conditional model (trained with --cond), or in "
                             "ddpm.py a --classifier (default: none, unconditional)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale s of a conditional model with --class: 0 "
                             "unconditional, 1 plain conditional, > 1 follows the class more strictly (default: 3)")


def check_sampler(sampler, T):
    """ValueError with a sentence for a schedules.Sampler that would give no or wrong images on a
    chain of T steps."""
    name, num_steps, eta, spacing = sampler
    if name not in schedules.SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; use {', '.join(schedules.SAMPLERS)}")
    if spacing is not None and spacing not in schedules.SPACINGS:
        raise ValueError(f"unknown --spacing '{spacing}'; use {', '.join(schedules.SPACINGS)}")
    if num_steps is not None and not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= T):
        raise ValueError(f"--steps must be between 1 and T={T}, got {num_steps}")
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):  # also refuses nan
        raise ValueError(f"--eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if name != "ddim" and eta != 0:
        raise ValueError(f"--eta sets DDIM's noise; --sampler {name} has none to set. Use "
                         "--sampler ddim, or leave --eta out")


def distilled_sampler(steps, sampler):
    """The Sampler of a model distilled for `steps` sampling steps (distill.py; 0: not distilled,
    the one given, ddpm where it names none). A student knows one chain, the one it was trained
    on: deterministic DDIM over the trailing t's of exactly `steps` steps. That is its default,
    and any other sampler, step count, eta or spacing is a ValueError with a sentence."""
    name, num_steps, eta, spacing = sampler
    if not steps:
        return sampler._replace(name=name or "ddpm")
    asked = [(flag, value) for flag, value, fits in (("--sampler", name, name in (None, "ddim")),
                                            ("--steps", num_steps, num_steps in (None, steps)),
                                            ("--eta", eta, not eta),
                                            ("--spacing", spacing, spacing in (None, "trailing"))) if not fits]
    if asked:
        raise ValueError(f"this model was distilled to sample in exactly {steps} deterministic DDIM steps "
                         f"(--sampler ddim --steps {steps} --eta 0 --spacing trailing, its defaults), so it "
                         f"cannot sample with {', '.join(f'{f} {v}' for f, v in asked)}; leave "
                         f"{'that flag' if len(asked) == 1 else 'those flags'} out, or sample its teacher")
    return Sampler("ddim", steps, 0.0, "trailing")


GUIDANCE = 3.0  # --guidance where it is not given


def guidance_scale(given, conditional, classes):
    """--guidance's value (GUIDANCE where not given), with a note where a given one changes nothing."""
    if given is not None and (not conditional or classes is None):
        messages.warn("--guidance has no effect: " + (
            "the model is unconditional (trained without --cond)" if not conditional
            else "without --class the samples are unconditional"), "note")
    return GUIDANCE if given is None else given


def distilled_guidance(built_in, given, conditional, classes):
    """(the scale to guide the network with, the scale the samples have) for --guidance `given`
    (None: GUIDANCE). A student distilled with guidance s built in (built_in != 1, distill.py) has
    it in its labelled branch: it samples that branch as it is for s or no --guidance, and its
    unconditional branch for 0; another scale is a ValueError. Other models: the given scale."""
    scale = guidance_scale(given, conditional, classes)
    if built_in == 1 or not conditional or classes is None:
        return scale, scale
    if given is None or given == built_in:
        return 1.0, built_in
    if given == 0:
        return 0.0, 0.0
    raise ValueError(f"--guidance {given:g}: this student was distilled with classifier-free guidance "
                     f"{built_in:g} built in, so it samples at that scale (leave --guidance out) or "
                     "unconditionally (--guidance 0); distil its teacher again for another scale")


def parse_classes(spec, names):
    """The class indices `--class` asks for: 'all', or a comma list of names or indices."""
    if spec == "all":
        return list(range(len(names)))
    classes = []
    for part in str(spec).split(","):
        part = part.strip()
        if part in names:
            classes.append(list(names).index(part))
        elif part.isdigit() and int(part) < len(names):
            classes.append(int(part))
        else:
            raise ValueError(f"--class {part}: not a class of this model; use an index 0..{len(names) - 1}, "
                             f"a name ({', '.join(names)}), a comma list, or all")
    return classes


def class_labels(classes, n):
    """(labels, images per grid row): n images of one class, or a row of ceil(n / K) images
    for each of K classes."""
    if len(classes) == 1:
        return np.full(n, classes[0]), None
    per_class = math.ceil(n / len(classes))
    return np.repeat(classes, per_class), per_class


def write_samples(images, out, nrow=None, outdir=None, process=None, first_batch=None):
    """The samples' grid at `out`, one PNG each in outdir, and the process pictures of the first
    batch (a ProcessFrames); a sentence naming what was written."""
    try:  # the samples first: pictures of the process that cannot be written do not lose them
        pictures.save_grid(images, out, nrow)
        if outdir:
            for k, image in enumerate(images):
                pictures.save_picture(pictures.pil_image(image), os.path.join(outdir, f"{k:05d}.png"))
        if process is not None:
            process.save(images[:first_batch])
    except files.WriteFailed:  # a disk that filled: its sentence names the file, and the old one is whole
        raise
    except OSError as e:
        where = f"'{e.filename}': " if e.filename else ""
        raise ValueError(f"the samples could not be written ({where}{e.strerror or e})") from None
    return (f"wrote {out}" + (f" and {len(images)} PNGs in {outdir}" if outdir else "") +
            (f", the process in {' and '.join(process.shown)}" if process is not None and process.shown else ""))
