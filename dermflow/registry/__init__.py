"""The model registry in the bucket: registered models, champions, run resolution, retention."""
