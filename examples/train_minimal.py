"""Train, save, predict and evaluate a defectflow model in one readable path, without Prefect.

    .venv/bin/python examples/train_minimal.py [DATA_ROOT] [key=value ...]

DATA_ROOT: a dataset in MVTec AD layout (default: a small synthetic one, generated into a
temporary folder). The pipeline (`defectflow train`) adds validation, tuning, calibration, the
anomaly head, TFLite export, the gate and packaging around these same steps; this file shows
the steps themselves, with the modules that do them.
"""

import sys
import tempfile
from pathlib import Path

import keras

from defectflow.artifacts import ModelInfo
from defectflow.config import load_config
from defectflow.data.dataset import load_split, make_dataset
from defectflow.data.mvtec import class_names, scan_dataset
from defectflow.data.split import select, stratified_split
from defectflow.data.synthetic import generate_dataset
from defectflow.evaluation.evaluate import evaluate
from defectflow.inference.predictor import Predictor
from defectflow.models.unet import build_model
from defectflow.training.train import compile_model

args = sys.argv[1:]
work = Path(tempfile.mkdtemp(prefix="defectflow-minimal-"))
if args and "=" not in args[0]:
    root = Path(args.pop(0))
else:
    root = generate_dataset(
        work / "capsule", image_size=64, n_train_good=12, n_test_good=4, n_per_defect=6, seed=0
    )

# 1. Configuration: configs/default.yaml, then configs/tiny.yaml's small model, then the command line.
cfg = load_config("tiny", [f"data.root={root}", "train.epochs=15", *args])
size = cfg.model.input_size
keras.utils.set_random_seed(cfg.train.seed)

# 2. Data: find the images and masks, split every class 70/15/15, load them at the model's size.
samples = scan_dataset(root)
classes = class_names(samples)
rows = stratified_split(
    samples, cfg.data.split.train, cfg.data.split.val, cfg.data.split.test, cfg.data.split.seed
)
train, val, test = (select(rows, name) for name in ("train", "val", "test"))
train_ds = make_dataset(
    load_split(train, classes, size), cfg.train.batch_size, shuffle=True, oversample=True
)
val_ds = make_dataset(load_split(val, classes, size), cfg.train.batch_size)
print(
    f"{len(samples)} images, classes {classes}: {len(train)} train, {len(val)} val, {len(test)} test"
)

# 3. Model: a U-Net with a class head and a mask head, trained on both losses at once.
model = build_model(
    cfg.model.backbone,
    size,
    len(classes),
    base_filters=cfg.model.base_filters,
    depth=cfg.model.depth,
    weights="none",
)
compile_model(model, cfg, cfg.train.learning_rate)
model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, verbose=2)

# 4. Save the model folder serving reads: model.keras and model.json (classes, size, thresholds).
model_dir = work / "model"
model_dir.mkdir()
model.save(model_dir / "model.keras")
ModelInfo(classes=classes, input_size=size, mask_threshold=cfg.eval.mask_threshold).save(model_dir)

# 5. Predict one image the way the service does (decode, resize, forward pass, mask at full size).
predictor = Predictor.load(model_dir)
answer = predictor.predict_bytes(test[0].path.read_bytes())
print(
    f"{test[0].path.name} ({test[0].label}): {answer.label}, mask of {int(answer.mask.sum())} pixels"
)

# 6. Evaluate on the test split: accuracy, defect presence, Dice of the masks.
result = evaluate(predictor, test)
print(result.markdown())
print(f"model folder: {model_dir}")
