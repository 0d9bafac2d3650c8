"""evaluate.py offline: the metrics against closed forms, the whole FID/IS/KID pipeline with a
randomly initialised Inception-v3 standing in for the real weights (which cannot be downloaded
here), the same features by the folder and the checkpoint paths, resumable sampling, and the
judge of the built-in shapes."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import ddpm
import evaluate
import export
import pictures
from conftest import refusal


# -- the metrics --------------------------------------------------------------------------------

def test_frechet_distance_of_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)  # diagonal: tr sqrt(S_a S_b) = sum sqrt(a b)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = evaluate.frechet_distance({"mu": mu_a, "sigma": np.diag(a)}, {"mu": mu_b, "sigma": np.diag(b)})
    m = rng.normal(size=(d, d))
    A = m @ m.T + 0.1 * np.eye(d)  # S_b = c^2 S_a: FID = (1 - c)^2 tr(S_a) for equal means
    got2 = evaluate.frechet_distance({"mu": mu_a, "sigma": A}, {"mu": mu_a, "sigma": 9 * A})
    print(f"FID diagonal: {got:.10f} vs {expected:.10f}; scaled: {got2:.8f} vs {4 * np.trace(A):.8f}")
    assert got == pytest.approx(expected, rel=1e-9) and got2 == pytest.approx(4 * np.trace(A), rel=1e-6)


def test_frechet_distance_of_samples_converges():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 4))
    y = rng.normal(size=(20000, 4)) * 2 + 1
    got = evaluate.frechet_distance(evaluate.statistics(x), evaluate.statistics(y))
    expected = 4 * 1 + 4 * (2 - 1) ** 2  # ||1||^2 + sum (sqrt(4) - sqrt(1))^2
    print(f"FID of samples {got:.4f}, closed form {expected}")
    assert got == pytest.approx(expected, rel=0.03)


def test_inception_score_closed_forms():
    certain = np.zeros((1000, 1008))
    certain[np.arange(1000), np.arange(1000) % 10] = 100.0  # sure of one of 10 balanced classes
    assert evaluate.inception_score(certain, splits=1)[0] == pytest.approx(10, rel=1e-6)
    same = np.tile(np.random.default_rng(0).normal(size=1008), (500, 1))  # one p(y|x) for all
    assert evaluate.inception_score(same, splits=1)[0] == pytest.approx(1, abs=1e-9)


@pytest.mark.heavy
def test_kid_is_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
    same, _ = evaluate.kernel_inception_distance(a, b)
    shifted, _ = evaluate.kernel_inception_distance(a, b + 1)
    print(f"KID same distribution {same:.2e}, shifted by 1 {shifted:.2e}")
    assert abs(same) < 0.01 and shifted > 0.5


# -- the pipeline, with stand-in Inception weights -------------------------------------------------

def make_standin_weights(path):
    """torch-fidelity's Inception-v3 with its random initial weights, saved where real ones would go."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    real_load = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    real_url = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *args, **kw: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("standin", ["2048"])
        # He initialisation keeps the activations' scale through the ~100 layers (PyTorch's
        # default shrinks it about 2.5x per layer: the features would all be ~1e-8, every FID 0)
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = real_load
        fe.load_state_dict_from_url = real_url
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    make_standin_weights(d / "inception.pth")
    cfg = ddpm.make_config("tiny", image_size=16)
    torch.manual_seed(0)
    checkpoints.save_checkpoint(d / "ckpt.pt", checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg)))
    ref = d / "ref"
    ref.mkdir()
    for k, img in enumerate(pictures.to_uint8(data.ShapesDataset(n=12, size=16, seed=5).images)):
        Image.fromarray(img).save(ref / f"{k:03d}.png")
    return d


def fid_args(d, *extra):
    return ["fid", "--inception-weights", d / "inception.pth", "--stats-dir", d / "stats", *extra]


@pytest.mark.slow  # FID end to end: the stand-in Inception on every image (seconds each)
def test_checkpoint_and_folder_give_the_same_numbers_and_sampling_resumes(setup, tmp_path):
    d = setup
    common = ["--ckpt", d / "ckpt.pt", "--n", 12, "--batch", 5, "--sampler", "ddim", "--steps", 3,
              "--ref", d / "ref", "--samples", tmp_path / "s", "--device", "cpu"]
    evaluate.main([str(a) for a in fid_args(d, *common, "--json", tmp_path / "a.json")])
    a = json.load(open(tmp_path / "a.json"))
    print(a)
    assert {"fid", "inception_score", "inception_score_std", "kid", "kid_std", "n_samples"} <= set(a)
    assert a["n_samples"] == 12 and np.isfinite(a["fid"]) and a["fid"] > 0 and a["inception_score"] >= 1
    assert len(os.listdir(d / "stats")) == 1  # the reference statistics, cached
    # the folder the checkpoint path wrote, given as a folder: the same numbers
    evaluate.main([str(a) for a in fid_args(d, tmp_path / "s", d / "ref", "--json", tmp_path / "b.json")])
    b = json.load(open(tmp_path / "b.json"))
    assert (b["fid"], b["inception_score"], b["kid"]) == (a["fid"], a["inception_score"], a["kid"])
    # the stand-in network tells sets apart: an untrained model's noise is far from the shapes,
    # the shapes are at 0 from themselves (with PyTorch's default init every FID would be ~0)
    evaluate.main([str(a) for a in fid_args(d, d / "ref", d / "ref", "--json", tmp_path / "r.json")])
    same = json.load(open(tmp_path / "r.json"))["fid"]
    print(f"FID noise vs shapes {a['fid']:.2f}, shapes vs themselves {same:.2e}")
    assert a["fid"] > 10 and abs(same) < 1e-3
    # an interrupted run: the missing images are made again, the same ones
    before = {f: (tmp_path / "s" / f).read_bytes() for f in sorted(os.listdir(tmp_path / "s")) if f.endswith(".png")}
    for f in sorted(before)[7:]:
        os.remove(tmp_path / "s" / f)
    evaluate.main([str(a) for a in fid_args(d, *common, "--json", tmp_path / "c.json")])
    assert {f: (tmp_path / "s" / f).read_bytes() for f in before} == before
    assert json.load(open(tmp_path / "c.json"))["fid"] == a["fid"]


@pytest.mark.heavy
def test_a_full_disk_under_the_statistics_cache_warns_and_the_fid_is_still_given(setup, small_disk, tmp_path, capsys):
    """The reference statistics are computed, then their cache (--stats-dir) is on a disk with no
    byte left: a warning, and the FID is printed and written all the same, with no partial cache."""
    d = setup
    disk = small_disk(1 << 20)
    disk.fill()
    evaluate.main([str(a) for a in ["fid", "--inception-weights", d / "inception.pth", "--stats-dir", disk.path / "stats",
                                    d / "ref", d / "ref", "--json", tmp_path / "r.json"]])
    out, err = capsys.readouterr()
    print(err.strip().splitlines()[-1])
    assert "not cached" in err and "No space left" in err and "Traceback" not in err
    assert abs(json.load(open(tmp_path / "r.json"))["fid"]) < 1e-3 and "FID" in out
    assert os.listdir(disk.path / "stats") == []


@pytest.mark.slow  # FID end to end: the stand-in Inception on every image (seconds each)
def test_onnx_samples_and_a_stats_file(setup, tmp_path):
    d = setup
    export.export(str(d / "ckpt.pt"), str(tmp_path / "m.onnx"))
    evaluate.main([str(a) for a in fid_args(d, "--onnx", tmp_path / "m.onnx", "--n", 6, "--batch", 3,
                                             "--sampler", "ddim", "--steps", 2, "--ref", d / "ref",
                                             "--samples", tmp_path / "o", "--provider", "cpu",
                                             "--json", tmp_path / "o.json")])
    result = json.load(open(tmp_path / "o.json"))
    assert result["n_samples"] == 6 and np.isfinite(result["fid"])
    stats = os.path.join(d / "stats", os.listdir(d / "stats")[0])
    evaluate.main([str(a) for a in fid_args(d, tmp_path / "o", stats, "--json", tmp_path / "p.json")])
    assert json.load(open(tmp_path / "p.json"))["fid"] == result["fid"]


def test_mistakes_are_sentences(setup, tmp_path, monkeypatch):
    d = setup
    refusal(evaluate.main, fid_args(d, tmp_path), "give --ckpt or --onnx")
    refusal(evaluate.main, fid_args(d, "--ckpt", d / "ckpt.pt", "--ref", "imagenet"), "--ref 'imagenet'")
    refusal(evaluate.main, fid_args(d, "--ckpt", d / "missing.pt", "--ref", d / "ref", "--n", 4,
                                    "--samples", tmp_path / "x"), "does not exist")
    refusal(evaluate.main, fid_args(d, "--ckpt", d / "ckpt.pt", "--ref", d / "ref", "--n", 1), "--n 1")
    refusal(evaluate.main, ["fid", "--inception-weights", tmp_path / "nope.pth", d / "ref", d / "ref"],
            "does not exist")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    refusal(evaluate.main, fid_args(d, d / "ref", tmp_path / "bad.npz"), "cannot be read")
    # no weights and no network: which file to fetch, and where to put it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    refusal(evaluate.main, ["fid", d / "ref", d / "ref"], "weights-inception-2015-12-05-6726825d.pth",
            "--inception-weights")


# -- the judge of the built-in shapes ---------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(shapes_judge):
    return shapes_judge


@pytest.mark.slow
def test_the_judge_passes_the_dataset_and_fails_what_is_not_it(classifier):
    real = pictures.to_uint8(data.ShapesDataset(n=200, size=32, seed=77).images)
    good = evaluate.judge_shapes(real, classifier)["good"].mean()
    noise = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    bright = real.copy()
    bright[real.max(axis=3) < 120] = 200  # the dataset's shapes on a bright background
    verdict = evaluate.judge_shapes(bright, classifier)
    two_colours = real.copy()
    shape = np.abs(real.astype(int) - real[:, :1, :1].astype(int)).max(axis=3) > 60  # far from the corner
    left = shape & (np.arange(32) < 16)[None, None, :]
    shifted = 140 + (two_colours[left].astype(int) - 140 + 58) % 116  # every channel 58 away, still in range
    two_colours[left] = shifted.astype(np.uint8)  # the left half of each shape in a second colour
    print(f"judge: dataset {good:.1%}, noise {evaluate.judge_shapes(noise, classifier)['good'].mean():.1%}, "
          f"bright backgrounds {verdict['good'].mean():.1%}, two-colour shapes "
          f"{evaluate.judge_shapes(two_colours, classifier)['good'].mean():.1%}")
    assert good > 0.97
    assert evaluate.judge_shapes(noise, classifier)["good"].mean() == 0
    assert verdict["background in range"].mean() == 0 and verdict["good"].mean() == 0
    assert evaluate.judge_shapes(two_colours, classifier)["good"].mean() < 0.1


def test_grid_cells_are_read_back(tmp_path):
    images = pictures.to_uint8(data.ShapesDataset(n=7, size=32, seed=3).images)
    pictures.save_grid(images, str(tmp_path / "g.png"))
    cells = evaluate.split_grid(str(tmp_path / "g.png"), 32)
    assert np.array_equal(cells, images)  # 7 of a 3x3 grid: the empty cells are left out
    refusal(evaluate.main, ["shapes", tmp_path / "g.png", "--cell", 30], "not a grid of 30x30")


@pytest.mark.heavy
def test_the_judge_is_trained_once_and_kept(tmp_path, monkeypatch):
    """evaluate.py shapes keeps the judge's classifier (weights only) and reuses it; a broken cache
    is trained again. Small settings here, so the training is quick."""
    import evaluate
    calls = []
    real = evaluate.train_shapes_classifier
    monkeypatch.setattr(evaluate, "train_shapes_classifier", lambda *a: calls.append(a) or real(*a))
    first, acc1 = evaluate.shapes_judge(str(tmp_path), n=512, steps=20, seed=3)
    second, acc2 = evaluate.shapes_judge(str(tmp_path), n=512, steps=20, seed=3)
    assert len(calls) == 1 and acc1 == acc2
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(first(x), second(x))  # the same classifier, read back
    (tmp_path / "shapes_judge-512-20-3.pt").write_bytes(b"not a checkpoint")
    evaluate.shapes_judge(str(tmp_path), n=512, steps=20, seed=3)
    assert len(calls) == 2  # trained again


@pytest.mark.slow  # FID end to end: the stand-in Inception on every image (seconds each)
def test_fid_of_a_conditional_model_samples_the_classes_asked_for(setup, tmp_path, capsys):
    """--class and --guidance as sampling takes them, through PyTorch and ONNX Runtime; without
    --class a note says the samples are unconditional."""
    d = setup
    cfg = ddpm.make_config("tiny", image_size=16, cond=True, num_classes=len(data.SHAPE_CLASSES),
                           class_names=data.SHAPE_CLASSES)
    torch.manual_seed(1)
    checkpoints.save_checkpoint(tmp_path / "cond.pt", checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg)))
    export.export(str(tmp_path / "cond.pt"), str(tmp_path / "cond.onnx"))
    common = ["--n", 4, "--batch", 2, "--sampler", "ddim", "--steps", 2, "--ref", d / "ref", "--device", "cpu",
              "--provider", "cpu"]
    results = {}
    for name, source, extra in (("ckpt", ["--ckpt", tmp_path / "cond.pt"], ["--class", "all", "--guidance", 3]),
                                ("onnx", ["--onnx", tmp_path / "cond.onnx"], ["--class", "circle,star"]),
                                ("none", ["--ckpt", tmp_path / "cond.pt"], [])):
        evaluate.main([str(a) for a in fid_args(d, *source, *common, *extra, "--samples", tmp_path / name,
                                                 "--json", tmp_path / f"{name}.json")])
        results[name] = json.load(open(tmp_path / f"{name}.json"))["fid"]
        assert json.load(open(tmp_path / name / "source.json"))["class"] == (extra[1] if extra else None)
    assert "sampled unconditionally" in capsys.readouterr().err
    print(f"FID of 4 samples: --class all {results['ckpt']:.1f}, ONNX circle,star {results['onnx']:.1f}, "
          f"unconditional {results['none']:.1f}")
    assert len(set(results.values())) == 3  # three different sets of samples


@pytest.mark.slow  # FID end to end: the stand-in Inception on every image (seconds each)
def test_samples_and_statistics_of_something_else_are_never_reused(setup, tmp_path):
    d = setup
    common = ["--ckpt", d / "ckpt.pt", "--n", 4, "--batch", 2, "--sampler", "ddim", "--steps", 2,
              "--samples", tmp_path / "s", "--device", "cpu", "--stats-dir", tmp_path / "stats"]
    ref = tmp_path / "ref"
    ref.mkdir()
    for f in sorted(os.listdir(d / "ref"))[:6]:
        (ref / f).write_bytes((d / "ref" / f).read_bytes())
    evaluate.main([str(a) for a in fid_args(d, *common, "--ref", ref)])
    refusal(evaluate.main, fid_args(d, *common, "--ref", ref, "--seed", 1), "holds samples of another model")
    (ref / "extra.png").write_bytes((d / "ref" / sorted(os.listdir(d / "ref"))[7]).read_bytes())
    evaluate.main([str(a) for a in fid_args(d, *common, "--ref", ref)])
    assert len(os.listdir(tmp_path / "stats")) == 2  # the changed folder's statistics, computed anew


def test_16_bit_pngs_are_read_as_training_reads_them(tmp_path):
    Image.fromarray(np.full((8, 8), 200 * 257, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    images = evaluate.read_images([tmp_path / "deep.png", tmp_path / "flat.png"])
    assert images[0].max() == images[0].min() == 200 and np.array_equal(images[0], images[1])


def test_unreadable_images_are_sentences(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    for name in ("empty.png", "text.png"):
        refusal(evaluate.main, ["shapes", tmp_path / name], "cannot be read")
    refusal(evaluate.main, ["shapes", tmp_path / "text.png", "--cell", 0], "--cell")
