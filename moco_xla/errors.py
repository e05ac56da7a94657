"""Exceptions that end a run with one ``error: ...`` line and a documented exit code.

Exit codes of ``python -m moco_xla.launch`` (scripts and schedulers branch on them):
    0   the run finished (summary.json written)
    2   bad input: config, CLI flag, path, data, checkpoint (UserError)
    3   the loss became NaN or inf; the last good checkpoint is untouched (NonFiniteLoss)
    75  stopped on SIGTERM after writing a checkpoint: rerun with ``--resume auto``
        (Preempted; 75 is EX_TEMPFAIL of sysexits.h, "try again later")
    128+N  a replica process was killed by signal N (e.g. 137 for SIGKILL, the OOM killer):
        rerun with ``--resume auto`` to continue from the last checkpoint
"""

EXIT_OK = 0
EXIT_USER = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75


class RunStopped(Exception):
    """Base class: a run that ends on purpose, with a one-line message and an exit code."""

    exit_code = 1


class UserError(RunStopped):
    """Bad input (config, CLI flag, path, data). The CLI prints ``error: <message>`` and exits 2."""

    exit_code = EXIT_USER


class NonFiniteLoss(RunStopped):
    """The loss became NaN or inf; raised before any checkpoint of the broken state is written."""

    exit_code = EXIT_NONFINITE


class Preempted(RunStopped):
    """SIGTERM: every replica stopped at the same step and a checkpoint was written."""

    exit_code = EXIT_PREEMPTED
