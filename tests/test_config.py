import pytest

from defectflow.config import ConfigError, from_yaml, load_config, to_yaml


def test_defaults_merge_named_config_and_overrides():
    cfg = load_config("demo", ["train.epochs=3", "model.input_size=64"])
    assert cfg.train.epochs == 3
    assert cfg.model.input_size == 64
    assert cfg.tune.max_trials == 2  # from configs/tuner/demo.yaml, chosen by configs/demo.yaml
    assert cfg.data.root == cfg.data.synth.out  # interpolation resolved


def test_saved_config_round_trips():
    cfg = load_config("default", ["train.batch_size=4"])
    again = from_yaml(to_yaml(cfg))
    assert again.train.batch_size == 4
    assert again == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochs=many"], "invalid configuration"),
        (["no_such_key=1"], "invalid configuration"),
        (["train.epochs"], "key=value"),
        (["data.split.train=0.9"], "sum to 1"),
        (["model.input_size=100"], "divisible by 32"),
        (["model.backbone=plain", "model.input_size=100"], "divisible by 16"),
        (["model.backbone=vgg"], "lite0, mobilenetv2, efficientnetb0, plain"),
        (["tune.space.backbone=[lite0,vgg]"], "got 'vgg'"),
        (["tune.space.input_size=[256,100]"], "input_size=100"),
        (["tune.algorithm=annealing"], "grid, random, hyperband, bayesian"),
        (["tune.space_file=nope"], "unknown tune.space_file"),
        (["train.mixed_precision=maybe"], "auto, on, off"),
        (["train.device=tpu"], "auto, cpu, gpu"),
        (["eval.mask_threshold=1.5"], "mask_threshold"),
        (["serve.max_request_pixels=200000000"], "at most serve.max_inflight_pixels"),
        (["serve.max_request_pixels=0"], "serve.max_request_pixels must be >= 1"),
        (["serve.inbox.allow_anonymous_review=perhaps"], "invalid configuration"),
    ],
)
def test_bad_overrides_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*demo"):
        load_config("nope")


def test_config_file_path_is_accepted(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 7\n")
    assert load_config(str(path)).train.epochs == 7


def test_tuner_file_sits_between_named_config_and_command_line():
    cfg = load_config("capsule")
    assert cfg.tune.algorithm == "bayesian" and list(cfg.tune.space.augment_strength) == [
        0.5,
        1.0,
        1.5,
    ]
    assert list(cfg.tune.space.backbone) == []  # not searched: model.backbone stays
    cfg = load_config("capsule", ["tune.max_trials=9", "tune.space.base_filters=[8]"])
    assert cfg.tune.max_trials == 9 and list(cfg.tune.space.base_filters) == [8]


def test_every_tuner_file_loads():
    from defectflow.config import tuner_dir

    files = sorted(tuner_dir().glob("*.yaml"))
    assert {"default", "grid", "wide", "capsule"} <= {f.stem for f in files}
    for path in files:
        assert load_config("default", [f"tune.space_file={path.stem}"]).tune.max_trials >= 1


def test_on_off_settings_accept_yaml_booleans():
    cfg = load_config("default", ["train.mixed_precision=on", "train.jit_compile=off"])
    assert (cfg.train.mixed_precision, cfg.train.jit_compile) == ("on", "off")
