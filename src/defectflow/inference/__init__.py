"""Inference: from an image to an answer, the one path training, evaluation and serving share.

Here: decoding and resizing (`preprocessing`), model outputs to a `Prediction` under the
model's decision policy (`postprocessing`), the anomaly score of the patch distances
(`anomaly_score`), the `Predictor` with its Keras and TFLite backends (`predictor`) and the
offline `defectflow predict` over files and folders (`inspection`).

May import: `defectflow.models` (the custom layers a model.keras needs), the foundations
(`artifacts`, `config`, `files`), numpy, OpenCV, Keras and the TFLite runtime. Never data,
training, evaluation, serving, orchestration, the CLI, KerasTuner, Great Expectations,
Prefect, scikit-learn, SciPy, pandas or matplotlib: the served Bento carries this package.
"""
