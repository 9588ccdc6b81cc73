"""Flow `derm-rescore`: score a registered model on another split's test rows, on a trainer.

A promotion compares a challenger with its label set's champion on the challenger's test split;
a champion scored on another split must be run again on it. That is model work, so it runs
here, as `derm-rescore/default` on the `gpu` queue holding a `gpu` slot, started by
`tasks.registry.rescore_on_a_trainer` (a subflow of the promoting run in the UI), never in the
orchestrator's process. The score goes to the bucket (`layout.model_score_key`).
"""

from prefect import flow
from prefect.concurrency.sync import concurrency

from dermflow.config import describe_parameters
from dermflow.runs import check_run_id
from tasks.common import settings
from tasks.registry import score_on_split


@flow(name="derm-rescore", log_prints=True)
@describe_parameters(
    run_id="Run of the registered model to score.",
    architecture="Architecture of that model.",
    split_key="Bucket key of the split manifest whose test rows it is scored on.",
    split_hash="That split's hash (names the stored score).",
    gpu_limit="Name of the global concurrency limit whose slot the scoring holds.",
)
def derm_rescore(run_id: str, architecture: str, split_key: str, split_hash: str, gpu_limit: str = "gpu") -> float:
    """Test weighted F1 of a registered model on another split's test rows (a champion's
    re-scoring for a promotion)."""
    check_run_id(run_id)  # before the slot is taken: the id becomes a local cache path
    with concurrency(gpu_limit, occupy=1, lease_duration=settings().gpu_lease_seconds):
        return score_on_split(run_id, architecture, split_key, split_hash)["score"]
