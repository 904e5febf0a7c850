"""Trainer configuration, LR schedules, buckets and dataset-folder rules (no model needed)."""

import math
from pathlib import Path

import pytest

from lumina_turbo.devtools.example_dataset import solid_image, write_image
from lumina_turbo.training import buckets, config, data_files, optim

SEED_TOML = """
[model]
dit = "/models/zimage"
output_dir = "out/acrf"

[acrf]
turbo_steps = 8
shift = 3.0
jitter_scale = 0.02
latent_jitter_scale = 0.0

[lora]
network_dim = 16
network_alpha = 8

[training]
optimizer_type = "AdamW"
learning_rate = 5e-5
weight_decay = 0.01
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 100
lr_num_cycles = 1
lambda_l1 = 1.0
lambda_cosine = 0.1
enable_freq = true
lambda_freq = 0.3
alpha_hf = 1.0
beta_lf = 0.2
snr_gamma = 5.0
num_train_epochs = 10
gradient_accumulation_steps = 4
seed = 42

[advanced]
max_grad_norm = 1.0
gradient_checkpointing = true
mixed_precision = "bf16"

[dataset]
batch_size = 1
shuffle = true
enable_bucket = true
max_sequence_length = 512

[[dataset.sources]]
folder = "/data/concept"
num_repeats = 10
"""


def write(tmp_path, text):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_seed_toml_reads_into_config(tmp_path):
    c = config.load_toml(write(tmp_path, SEED_TOML))
    assert c.transformer == "/models/zimage" and c.turbo_steps == 8 and c.network_alpha == 8.0
    assert c.loss_mode == "frequency"  # enable_freq = true, enable_style absent
    assert c.loss_params == {
        "lambda_l1": 1.0,
        "lambda_cos": 0.1,
        "lambda_freq": 0.3,
        "alpha_hf": 1.0,
        "beta_lf": 0.2,
    }
    assert c.lr_scheduler == "cosine_with_restarts" and c.gradient_accumulation_steps == 4
    assert c.sources == [{"folder": "/data/concept", "num_repeats": 10}]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[training]\nlearning_rat = 1e-4\n", "[training] learning_rat"),
        ("[optimization]\nauto_optimize = true\n", "[optimization]"),
        ("[lora]\nlearning_rate = 1e-4\n", "[lora] learning_rate"),  # right key, wrong section
        ("[training]\nlambda_stlye = 0.3\n", "lambda_stlye"),  # a typo of a loss parameter
        ("[[dataset.sources]]\ncache_directory = 'x'\n", "cache_directory"),
        ("seed = 1\n", "seed"),  # keys belong in sections in a file
    ],
)
def test_unknown_or_misplaced_keys_are_named(tmp_path, text, needle):
    with pytest.raises(config.ConfigError, match=r"(?s)" + needle.replace("[", r"\[").replace("]", r"\]")):
        config.load_toml(write(tmp_path, text))


# The shape of AC-RF's own config/acrf_config.toml: the frequency and style
# blocks are switched off but keep their parameters.
ACRF_SHAPED_TOML = """
[acrf]
turbo_steps = 10
shift = 3.0
jitter_scale = 0.02

[lora]
network_dim = 16
network_alpha = 16

[training]
learning_rate = 5e-5
lambda_l1 = 1.0
lambda_cosine = 0.1
enable_freq = false
lambda_freq = 0.3
alpha_hf = 1.0
beta_lf = 0.2
enable_style = false
lambda_style = 0.3
lambda_struct = 1.0
lambda_light = 0.5
lambda_color = 0.3
lambda_tex = 0.5
snr_gamma = 5.0
num_train_epochs = 10
"""


def test_inactive_loss_parameters_are_accepted_with_a_warning(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lumina_turbo.training"):
        c = config.load_toml(write(tmp_path, ACRF_SHAPED_TOML))
    assert c.loss_mode == "standard"
    assert c.loss_params == {"lambda_l1": 1.0, "lambda_cos": 0.1}  # only what standard mode uses
    (record,) = [r for r in caplog.records if "inactive" in r.getMessage()]
    for name in ("alpha_hf", "beta_lf", "lambda_freq", "lambda_style", "lambda_struct", "lambda_tex"):
        assert name in record.getMessage()
    assert "lambda_l1" not in record.getMessage()
    # switched on, the same parameters are used
    c = config.load_toml(
        write(tmp_path, ACRF_SHAPED_TOML.replace("enable_freq = false", "enable_freq = true"))
    )
    assert (
        c.loss_mode == "frequency"
        and c.loss_params["alpha_hf"] == 1.0
        and "lambda_style" not in c.loss_params
    )
    # an inactive parameter still needs a valid value, and a name no mode knows is still an error
    with pytest.raises(config.ConfigError, match="alpha_hf must be a finite number"):
        config.load_toml(write(tmp_path, ACRF_SHAPED_TOML.replace("alpha_hf = 1.0", "alpha_hf = -1.0")))
    with pytest.raises(config.ConfigError, match="unknown loss parameter"):
        config.validate(config.TrainConfig(loss_params={"alpha_hff": 1.0}))
    # the node's advanced box takes the same route
    base = config.TrainConfig()
    assert config.parse_advanced("alpha_hf = 0.5\n", base, reserved=set()).loss_params == {}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[lora]\nnetwork_dim = 0\n", "network_dim must be an integer >= 1"),
        ("[training]\nlearning_rate = -1.0\n", "learning_rate must be a number >= 1e-07"),
        ("[training]\noptimizer_type = 'SGD'\n", "optimizer_type must be one of"),
        ("[acrf]\nuse_dynamic_shift = true\n", "use_dynamic_shift"),
        ("[training]\nloss_mode = 'standard'\nenable_style = true\n", "contradicts"),
        ("[dataset]\nbucket_step = 40\n", "multiple of 16"),
        ("[training]\nlambda_cos = 0.1\nlambda_cosine = 0.2\n", "again"),
        ("[lora]\ntrain_attention = false\ntrain_ffn = false\n", "no layer to train"),
        ("[advanced]\nblocks_to_swap = 4\ngradient_checkpointing = false\n", "needs gradient_checkpointing"),
    ],
)
def test_bad_values_are_refused(tmp_path, text, needle):
    with pytest.raises(config.ConfigError, match=needle):
        config.load_toml(write(tmp_path, text))


def test_advanced_box_accepts_flat_keys_and_refuses_widgets():
    base = config.TrainConfig()
    c = config.parse_advanced(
        "lambda_l1 = 0.5\nsnr_floor = 0.0\n[acrf]\nreplay_capacity = 16\n", base, reserved={"learning_rate"}
    )
    assert c.loss_params == {"lambda_l1": 0.5} and c.snr_floor == 0.0 and c.replay_capacity == 16
    with pytest.raises(config.ConfigError, match="inputs of this node"):
        config.parse_advanced("learning_rate = 1e-3", base, reserved={"learning_rate"})
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.parse_advanced("lambda_l1 =", base, reserved=set())


def test_enable_turbo_false_means_uniform_timesteps(tmp_path):
    assert config.load_toml(write(tmp_path, "[acrf]\nenable_turbo = false\n")).timestep_method == "uniform"


def test_lr_schedules_match_their_definitions():
    factor = optim.lr_factor
    assert [factor(s, schedule="constant", total_steps=10, warmup_steps=3) for s in range(5)] == [
        0.25,
        0.5,
        0.75,
        1,
        1,
    ]
    assert factor(0, schedule="cosine", total_steps=10) == 1.0
    assert math.isclose(factor(5, schedule="cosine", total_steps=10), 0.5)
    assert math.isclose(factor(5, schedule="linear", total_steps=10), 0.5)
    # two restarts over 10 steps: back to 1 at the start of the second cycle
    assert math.isclose(factor(5, schedule="cosine_with_restarts", total_steps=10, num_cycles=2), 1.0)
    assert math.isclose(
        factor(4, schedule="cosine_with_restarts", total_steps=10, num_cycles=2),
        0.5 * (1 + math.cos(math.pi * 0.8)),
    )


def test_adamw8bit_without_bitsandbytes_says_so():
    import torch

    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(optim.OptimizerUnavailable, match="bitsandbytes"):
        optim.make_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0)


def test_buckets_cover_aspect_ratios_within_budget():
    sizes = buckets.bucket_sizes(512, 64)
    assert (512, 512) in sizes and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert buckets.nearest_bucket(1920, 1080, sizes) == (640, 384)  # 16:9 -> 1.667, the nearest ratio
    assert buckets.nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert buckets.target_size(
        300, 900, resolution=512, step=64, enable_bucket=False, max_aspect_ratio=4
    ) == (512, 512)


def test_fit_to_bucket_covers_and_crops():
    image = solid_image((1.0, 0.0, 0.0), size=(100, 50))
    pixels = buckets.fit_to_bucket(image, (64, 64))
    assert pixels.shape == (1, 64, 64, 3) and float(pixels[..., 0].min()) == 1.0


def test_folder_rules(tmp_path):
    with pytest.raises(data_files.DatasetError, match="does not exist"):
        data_files.resolve_folder("nope", tmp_path)
    with pytest.raises(data_files.DatasetError, match="empty"):
        data_files.resolve_folder("  ", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_files.DatasetError, match="holds no images"):
        data_files.scan_folder(data_files.resolve_folder("empty", tmp_path))
    root = tmp_path / "set"
    write_image(root, "a", solid_image((1, 0, 0)), "red")
    write_image(root / "3_blue", "b", solid_image((0, 0, 1)), "blue")
    solid_image((0, 1, 0)).save(root / "3_blue" / "c.png")
    with pytest.raises(data_files.DatasetError, match=r"1 image\(s\) have no caption file.*c\.png"):
        data_files.scan_folder(root)
    (root / "3_blue" / "c.txt").write_text("green\n")
    records = data_files.scan_folder(root, num_repeats=2)
    assert [(Path(r.path).name, r.caption, r.repeats) for r in records] == [
        ("a.png", "red", 2),
        ("b.png", "blue", 3),
        ("c.png", "green", 3),
    ]
    assert data_files.resolve_folder(str(root), None) == root  # absolute path
