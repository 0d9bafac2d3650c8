"""convert.py without diffusers: the name mapping both ways, the layout it writes, and a
sentence for every folder it cannot use (tests/test_diffusers.py checks it against diffusers)."""
import contextlib
import io
import json
import os

import pytest
import torch

import checkpoints
import convert
import ddpm
from conftest import no_space_left, refusal

# google/ddpm-cifar10-32's unet/config.json on the hub (the keys that define the network)
GOOGLE_CONFIG = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_cifar10_preset_is_google_ddpm_cifar10_32():
    ours = convert.unet2d_config(ddpm.make_config("cifar10"))
    for key, value in GOOGLE_CONFIG.items():
        assert ours[key] == value, key
    back, learned = convert.model_config(GOOGLE_CONFIG)
    assert not learned
    preset = ddpm.make_config("cifar10")
    assert all(back[name] == getattr(preset, name) for name in ddpm.MODEL_FIELDS if name != "dropout")


@pytest.mark.parametrize("preset", list(ddpm.PRESETS))
def test_parameter_names_map_both_ways(preset):
    cfg = ddpm.make_config(preset)
    keys = list(ddpm.UNet(cfg).state_dict())
    theirs = [convert.diffusers_key(k, len(cfg.ch_mult)) for k in keys]
    assert len(set(theirs)) == len(keys)
    assert [convert.our_key(k, len(cfg.ch_mult)) for k in theirs] == keys
    assert "up_blocks.0.upsamplers.0.conv.weight" in theirs and "mid_block.attentions.0.to_out.0.bias" in theirs
    assert convert.our_key("mid_block.attentions.0.proj_attn.weight", len(cfg.ch_mult)) == "mid.attn_1.proj_out.weight"
    assert convert.our_key("something.else.weight", len(cfg.ch_mult)) is None


@pytest.fixture
def tiny_ckpt(tmp_path):
    cfg = ddpm.make_config("tiny", image_size=16)
    checkpoints.save_checkpoint(tmp_path / "tiny.pt", checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg)))
    return tmp_path / "tiny.pt"


def test_to_diffusers_writes_a_pipeline_folder_and_refuses_to_clobber(tiny_ckpt, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        convert.main(["--to-diffusers", str(tiny_ckpt)])
    out = tmp_path / "tiny-diffusers"
    files = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.safetensors"]
    assert json.load(open(out / "model_index.json"))["_class_name"] == "DDPMPipeline"
    refusal(convert.main, ["--to-diffusers", tiny_ckpt], "exists", "--overwrite")
    refusal(convert.main, ["--to-diffusers", tiny_ckpt, "-o", tiny_ckpt], "exists")
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with contextlib.redirect_stdout(io.StringIO()):
        convert.main(["--to-diffusers", str(tiny_ckpt), "--overwrite"])
    # and back: the round trip is exact
    with contextlib.redirect_stdout(io.StringIO()):
        convert.main(["--from-diffusers", str(out), "-o", str(tmp_path / "back.pt")])
    a, b = torch.load(tiny_ckpt, weights_only=True), torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(a["ema"][k], b["model"][k]) for k in a["ema"])


@pytest.mark.parametrize("prediction,theirs", [("v", "v_prediction"), ("x0", "sample")])
def test_prediction_type_goes_both_ways(tmp_path, prediction, theirs):
    cfg = ddpm.make_config("tiny", image_size=16, prediction=prediction, schedule="cosine")
    checkpoints.save_checkpoint(tmp_path / "m.pt", checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg)))
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tmp_path / "m.pt"), str(tmp_path / "d"))
        back = convert.from_diffusers(str(tmp_path / "d"), str(tmp_path / "back.pt"))
    assert json.load(open(tmp_path / "d" / "scheduler" / "scheduler_config.json"))["prediction_type"] == theirs
    assert (back.prediction, back.schedule) == (prediction, "cosine")


def test_unusable_folders_are_sentences(tiny_ckpt, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tiny_ckpt), str(tmp_path / "good"))
    unet = tmp_path / "good" / "unet"
    weights = (unet / "diffusion_pytorch_model.safetensors").read_bytes()

    refusal(convert.main, ["--from-diffusers", tmp_path / "nowhere"], "no config.json")
    (unet / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 143\n")
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tmp_path / "x.pt"],
            "Git LFS pointer", "git lfs pull")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(weights[:1000])
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tmp_path / "x.pt"], "corrupt")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    config = (unet / "config.json").read_text()
    (unet / "config.json").write_text("{not json")
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tmp_path / "x.pt"], "cannot be read as JSON")
    (unet / "config.json").write_text(json.dumps({"sample_size": 32}))
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tmp_path / "x.pt"], "not a UNet2DModel config")
    (unet / "config.json").write_text(config)
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tiny_ckpt], "exists", "--overwrite")
    refusal(convert.main, ["--from-diffusers", tmp_path / "good", "-o", tmp_path / "x.onnx"], ".pt")
    refusal(convert.main, ["--to-diffusers", tmp_path / "missing.pt"], "does not exist")
    refusal(convert.main, [], "required")
    assert not (tmp_path / "x.pt").exists()


def test_help_gives_every_flag_a_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        convert.main(["-h"])
    entries = [e for e in out.getvalue().split("\n  -")[1:] if not e.startswith("h, --help")]
    assert len(entries) == 5
    for entry in entries:
        assert "default" in entry, entry


@pytest.mark.parametrize("where,change,fragment", [
    ("unet", {"sample_size": 2 ** 30}, "sample_size"),
    ("unet", {"sample_size": "32"}, "not a whole number"),
    ("unet", {"block_out_channels": []}, "block_out_channels"),
    ("unet", {"block_out_channels": [0, 0]}, "block_out_channels"),
    ("unet", {"layers_per_block": "two"}, "layers_per_block"),
    ("unet", {"dropout": "0.1"}, "dropout"),
    ("scheduler", {"clip_sample": "false"}, "clip_sample"),
    ("scheduler", {"num_train_timesteps": 0}, "num_train_timesteps"),
    ("scheduler", {"beta_start": "1e-4"}, "beta_start"),
])
def test_malformed_diffusers_configs_are_sentences(tiny_ckpt, tmp_path, where, change, fragment):
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tiny_ckpt), str(tmp_path / "d"))
    path = tmp_path / "d" / where / ("config.json" if where == "unet" else "scheduler_config.json")
    path.write_text(json.dumps({**json.load(open(path)), **change}))
    refusal(convert.main, ["--from-diffusers", tmp_path / "d", "-o", tmp_path / "x.pt"], fragment)
    assert not (tmp_path / "x.pt").exists()


def test_a_json_nested_deeper_than_python_recurses_is_a_sentence(tiny_ckpt, tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tiny_ckpt), str(tmp_path / "d"))
    (tmp_path / "d" / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refusal(convert.main, ["--from-diffusers", tmp_path / "d", "-o", tmp_path / "x.pt"], "cannot be read as JSON")


def test_dropout_survives_the_round_trip(tmp_path):
    cfg = ddpm.make_config("tiny", image_size=16, dropout=0.0)
    checkpoints.save_checkpoint(tmp_path / "m.pt", checkpoints.checkpoint_state(cfg, ddpm.UNet(cfg)))
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tmp_path / "m.pt"), str(tmp_path / "d"))
        back = convert.from_diffusers(str(tmp_path / "d"), str(tmp_path / "back.pt"))
    assert back.dropout == 0.0


def test_overwrite_replaces_only_the_pipeline_files_and_never_the_input(tiny_ckpt, tmp_path):
    """--overwrite into a folder that holds other files, or the input itself."""
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "unet").mkdir()
    (out / "unet" / "keep.bin").write_bytes(b"mine too")
    with contextlib.redirect_stdout(io.StringIO()):
        convert.main(["--to-diffusers", str(tiny_ckpt), "-o", str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "unet" / "keep.bin").read_bytes() == b"mine too"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    inside = out / "model.pt"
    inside.write_bytes(tiny_ckpt.read_bytes())
    refusal(convert.main, ["--to-diffusers", inside, "-o", out, "--overwrite"], "holds the input")
    assert inside.read_bytes() == tiny_ckpt.read_bytes()


def test_a_real_full_disk_under_from_diffusers_is_a_sentence(tiny_ckpt, tmp_path, small_disk):
    """-o on a tmpfs with no byte left: torch's zip writer fails with a RuntimeError under the
    save; the command says so in one sentence and leaves no file or temporary file there."""
    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tiny_ckpt), str(tmp_path / "d"))
    disk = small_disk(1 << 20)
    disk.fill()
    message = refusal(convert.main, ["--from-diffusers", tmp_path / "d", "-o", disk.path / "back.pt"],
                      "cannot write", "back.pt", "No space left")
    print(message)
    assert sorted(os.listdir(disk.path)) == ["filler"]


def test_a_full_disk_is_a_sentence_and_leaves_nothing_behind(tiny_ckpt, tmp_path, monkeypatch):
    """Both ways, the write that fails with no space left: one sentence, no partial folder, file
    or temporary file."""
    import safetensors.torch

    with contextlib.redirect_stdout(io.StringIO()):
        convert.to_diffusers(str(tiny_ckpt), str(tmp_path / "d"))  # a good folder to convert back
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", no_space_left)
    refusal(convert.main, ["--to-diffusers", tiny_ckpt, "-o", tmp_path / "d2"], "cannot write", "No space left")
    monkeypatch.setattr(torch, "save", no_space_left)
    refusal(convert.main, ["--from-diffusers", tmp_path / "d", "-o", tmp_path / "back.pt"], "cannot write",
            "No space left")
    assert sorted(os.listdir(tmp_path)) == before
