"""dermflow core: pure functions and small classes for Fitzpatrick 17k classifiers (no Prefect)."""
