"""Serving: what the HTTP service needs beyond the Predictor, free of BentoML.

Here: the `serve:` settings, packed outputs, answers and log lines (`settings`), upload checks
before decoding (`uploads`), the ASGI guards in front of the service (`guards`), the review
inbox (`inbox`) and the /ui and /review pages (`web`). `service.py` at the repository root is
the BentoML adapter over these.

May import: inference, models (custom layers), the foundations (`artifacts`, `config`,
`files`, `registry`), numpy, OpenCV, Starlette. Never data, training, evaluation,
orchestration, the CLI or their libraries: bentofile.yaml packs exactly the import closure
of service.py, and tests/test_bento_contents.py checks it.
"""
