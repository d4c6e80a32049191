"""Training: making a model artifact from prepared data.

Here: the two-phase training with resume (`train`), the KerasTuner search (`tune`) and its
chief/worker form (`distributed_tuning`), fitting the anomaly head's memory bank
(`anomaly_fitting`), the TFLite export with its parity check (`export`) and the
leave-one-type-out study, which trains once per defect type (`leave_one_out`).

May import: data, models, inference, evaluation (export measures parity with its metrics; the
study evaluates what it trains) and the foundations; Keras, KerasTuner, TensorFlow. Never
serving, orchestration or the CLI.
"""
