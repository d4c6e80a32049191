"""Models: the networks, framework code only (no data, no files, no training loop).

Here: the pretrained encoders (`backbones`, `efficientnet_lite`, and `torch_legacy`, the
reader of the ImageNet weights file), the two-head U-Net (`unet`), its losses (`losses`), the
custom layers a saved model.keras refers to (`layers`) and the anomaly head graph
(`anomaly_head`).

May import: Keras / TensorFlow, numpy and `defectflow.artifacts` (output names). Never any
other defectflow package. Serving loads only `layers` and `losses` from here.
"""
