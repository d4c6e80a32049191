"""defectflow: visual defect inspection, classify and localise, retrain, serve."""

__version__ = "0.1.0"
