"""defectflow: visual defect inspection, classify and localise, retrain, serve.

Packages by concern, each `__init__` saying what belongs there and what it may import (the
rules are import contracts in pyproject.toml, run by `make test`; docs/architecture.md draws
the map): `data`, `models`, `inference`, `training`, `evaluation`, `serving`,
`orchestration`, `cli`. The modules here are foundations every package may import:
`artifacts` (the model folder contract), `config` (the one schema), `files` (atomic writes),
`environment` (where state lives) and `registry` (the model store and its stage book).
"""

__version__ = "0.1.0"
