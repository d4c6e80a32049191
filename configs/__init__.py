"""The default and named configs, installed as package data (`defectflow.configs`): see
docs/configuration.md."""
