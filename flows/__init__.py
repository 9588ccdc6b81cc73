"""Prefect flows: `derm` (full, fetch, refetch, retrain), `derm-fetch`, `derm-train`, `derm-tune`."""
