"""The one error base of dermflow, and the rule that decides what is worth retrying.

Every error dermflow raises on purpose derives from `DermflowError`. Each says whether it is
*transient* (the same call may succeed later: a network blip, S3 briefly down) or *permanent*
(bad input, a missing file, a config the user must fix). Prefect tasks retry only transient
errors (`tasks.common.retry_unless_permanent`), and the CLI prints any `DermflowError` as one
clear line.

The default is permanent: an error raised on purpose usually names something the user has to
change. Errors that come from outside dermflow (OSError, botocore, httpx, ...) are treated as
transient, since nothing here knows they cannot succeed.
"""

from __future__ import annotations


class DermflowError(Exception):
    """Base of dermflow's own errors; the message says what is wrong and what to do.

    `transient` (class default False) may be overridden per instance, for errors whose cause
    can be either, e.g. reading a source that is missing (permanent) or unreachable
    (transient).
    """

    transient: bool = False

    def __init__(self, *args: object, transient: bool | None = None) -> None:
        super().__init__(*args)
        if transient is not None:
            self.transient = transient


class TransientError(DermflowError):
    """An error that may go away by itself: retrying the same call is worthwhile."""

    transient = True


class RejectedError(DermflowError):
    """A permanent refusal with a one-word `reason` (a manifest reason, e.g. `blocked_address`,
    `not_an_image`) and a `detail` for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # rebuilt from its fields, not its message (crosses process pools)
        return (type(self), (self.reason, self.detail))


def is_transient(error: BaseException) -> bool:
    """True when retrying the call that raised `error` may help."""
    if isinstance(error, DermflowError):
        return error.transient
    return isinstance(error, Exception)
