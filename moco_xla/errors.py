"""One exception type for every mistake a user can make, printed as one line with exit code 2."""


class UserError(Exception):
    """Bad input (config, CLI flag, path, data). The CLI prints ``error: <message>`` and exits 2."""

    exit_code = 2
