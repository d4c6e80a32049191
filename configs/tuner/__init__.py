"""Tuner search spaces (`tune.space_file`), installed as package data."""
