"""Faults a user can act on (a damaged checkpoint, a failed save, a held lock, a diverged run).

`python -m meki_jax.train` prints a RunError as one line and exits 1, without a traceback.
"""


class RunError(RuntimeError):
  """The run cannot go on; the message says what happened, where, and what to do."""
