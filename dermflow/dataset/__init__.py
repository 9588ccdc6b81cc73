"""The dataset: near-duplicate grouping, the split, and the cached training arrays."""
