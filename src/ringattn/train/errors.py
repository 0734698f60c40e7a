"""The trainer's own stop: divergence (flag errors are parallel.UsageError, checkpoint errors
checkpoint.CheckpointError)."""


class Diverged(RuntimeError):
    """A non-finite loss, gradient norm or parameter: the run stops before saving that state."""
