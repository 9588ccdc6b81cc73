"""The model registry in the bucket: registered models and champions (`entries`), runs and
model resolution (`runs`), retention (`retention`). Plain storage: deciding a promotion needs
inference and lives in `dermflow.evaluation.promotion`."""
