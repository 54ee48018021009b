"""Exception classes: user-facing problems versus failed verification.

The CLI maps `InputError` to exit code 2 and `VerificationError` to exit code 1; anything else is
an internal bug and is reported as such (still on one line).
"""


class OnnxPruneError(Exception):
    """Base class of every error onnxprune raises on purpose."""


class InputError(OnnxPruneError):
    """Bad input or usage: unreadable model, invalid graph, bad option value (exit code 2)."""


class InternalError(OnnxPruneError):
    """A rule failed on one node: the message names the op and node so the bug can be reported
    and the layer excluded (exit code 2); the original exception is chained."""


class VerificationError(OnnxPruneError):
    """The pruned model does not match the original within the requested tolerance (exit code 1).

    `result` carries the failed run (model, plan, report) when there is one, so callers can still
    inspect or log the figures.
    """

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result
