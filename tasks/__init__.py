"""Thin Prefect tasks around the dermflow core: retries, logging, artifacts; keys between tasks."""
