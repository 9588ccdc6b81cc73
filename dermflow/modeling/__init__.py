"""Models: the architecture registry, training, and hyperparameter tuning."""
