"""Operations: the CLI and the local stack (SeaweedFS, Prefect server, workers). The only core package that may import Prefect."""
