"""The Great Expectations suites of the data gate, installed as package data
(`defectflow.expectations`): see docs/pipeline.md."""
