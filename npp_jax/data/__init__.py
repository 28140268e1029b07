"""Input data: token records, the grain training pipeline, and the embedded datasets."""
