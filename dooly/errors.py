"""One error type for everything a user can cause: the CLI turns it into one line and exit code 2."""


class DoolyError(Exception):
    """A problem with the user's input or environment (bad config, unreachable store, ...).

    The message is the single line the user sees; keep it specific and actionable.
    """

    exit_code = 2
