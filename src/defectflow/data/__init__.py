"""Data: what a dataset is and how it reaches training.

Here: the MVTec folder layout (`mvtec`), the train/val/test split (`split`), arrays and
`tf.data` pipelines (`dataset`), the joint image/mask augmentation (`augment`), the embedded
synthetic dataset (`synthetic`) and the Great Expectations gate over images and masks
(`validation`, its failure summaries in `validation_report`, its offline Data Docs assets in
`data_docs_assets`).

May import: `defectflow.inference` (images are read through the one preprocessing path), the
top-level foundations (`config`, `files`, `environment`, `artifacts`), numpy, OpenCV, Keras,
pandas and Great Expectations. Never training, evaluation, serving, orchestration or the CLI
(checked by the import contracts in pyproject.toml).
"""
