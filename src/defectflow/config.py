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

#: Repository root when running from a checkout (configs/ and expectations/ live there).
REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    return Path(os.environ.get("DEFECTFLOW_CONFIG_DIR", REPO_ROOT / "configs"))


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


@dataclass
class ValidationConfig:
    #: Great Expectations suite (JSON), relative to the repository root or absolute.
    suite: str = "expectations/images.json"
    min_side: int = 32
    max_side: int = 8192
    allowed_channels: list[int] = field(default_factory=lambda: [1, 3, 4])
    #: The smallest number of images any class may have (a split needs some of each).
    min_images_per_class: int = 3
    #: The classes the dataset must have, exactly (e.g. good + the defect folders). Empty: any.
    #: When given, the checks of `classes_suite` are added to the suite.
    expected_classes: list[str] = field(default_factory=list)
    classes_suite: str = "expectations/classes.json"
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
    #: Resampling of rotation/translation/zoom: nearest keeps 1-2 px defects sharp.
    interpolation: str = "nearest"
    #: How many augmented training samples the preview plot shows.
    preview_count: int = 8


@dataclass
class ModelConfig:
    #: lite0: EfficientNet-Lite0 encoder with ImageNet weights (offline); plain: a small
    #: encoder from random weights (fast, for tests; learns little on real data).
    backbone: str = "lite0"
    input_size: int = 128
    base_filters: int = 16
    #: Encoder depth of the plain backbone (lite0 always downsamples 5 times).
    depth: int = 4
    dropout: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 20
    #: First epochs train decoder and heads on a frozen pretrained encoder; the rest fine-tune
    #: the encoder too (BatchNorm stays frozen) at learning_rate * fine_tune_lr_factor.
    frozen_epochs: int = 5
    fine_tune_lr_factor: float = 0.1
    batch_size: int = 8
    learning_rate: float = 1e-3
    #: Weight of the mask loss next to the class loss.
    mask_loss_weight: float = 1.0
    #: Repeat images of rarer classes so each epoch shows every class equally often
    #: (good images dominate real data).
    oversample: bool = True
    #: Alternatively (or also), weigh the class loss inversely to class frequency.
    balance_classes: bool = False
    early_stopping_patience: int = 5
    #: auto: a GPU when TensorFlow sees one, else the CPU. gpu: fail if there is none.
    device: str = "auto"
    seed: int = 0
    verbose: int = 2


@dataclass
class TuneConfig:
    enabled: bool = True
    max_trials: int = 3
    epochs: int = 3
    #: Search space; the tuner picks one value from each list.
    base_filters: list[int] = field(default_factory=lambda: [8, 16])
    learning_rate: list[float] = field(default_factory=lambda: [1e-3, 3e-4])
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.3])
    seed: int = 0


@dataclass
class EvalConfig:
    #: Probability above which a mask pixel counts as defect.
    mask_threshold: float = 0.5
    #: How many test predictions the error-analysis plot shows.
    plot_count: int = 12


@dataclass
class GateConfig:
    """Absolute thresholds a new model must reach to be packaged."""

    min_accuracy: float = 0.0
    min_presence_accuracy: float = 0.0
    min_defect_dice: float = 0.0


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
    gate: GateConfig = field(default_factory=GateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)


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
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    """Value checks the types alone cannot express."""
    s = cfg.data.split
    if min(s.train, s.val, s.test) <= 0 or abs(s.train + s.val + s.test - 1.0) > 1e-6:
        raise ConfigError(f"data.split ratios must be > 0 and sum to 1, got {s.train}/{s.val}/{s.test}")
    if cfg.model.backbone not in {"lite0", "plain"}:
        raise ConfigError(f"model.backbone must be lite0 or plain, got {cfg.model.backbone!r}")
    divisor = 32 if cfg.model.backbone == "lite0" else 2**cfg.model.depth
    if cfg.model.input_size % divisor:
        raise ConfigError(
            f"model.input_size={cfg.model.input_size} must be divisible by {divisor} for the {cfg.model.backbone} backbone"
        )
    if cfg.train.device not in {"auto", "cpu", "gpu"}:
        raise ConfigError(f"train.device must be auto, cpu or gpu, got {cfg.train.device!r}")
    if not 0.0 < cfg.eval.mask_threshold < 1.0:
        raise ConfigError(f"eval.mask_threshold must be in (0, 1), got {cfg.eval.mask_threshold}")


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
    """Relative paths in configs are relative to the repository root (where configs/ lives)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (Path.cwd() / p)
