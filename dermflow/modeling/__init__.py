"""Models: the architecture registry (`models`); training (`recipe`: optimizers, phases and data
checks; `callbacks`; `checkpoints`; `train`: the entry point); hyperparameter tuning
(`search_space`, `tuning`, `tuning_results`, `tuning_sync`: the bucket mirror,
`tuning_distributed`: chief and worker processes)."""
