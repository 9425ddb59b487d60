"""The errors a user can cause or wait out; the CLI turns each into one line and its exit code.

Exit codes (docs/errors.md), chosen so a Kubernetes Job's podFailurePolicy can act on them:
  2   bad input (config, names, numbers, paths, credentials refused): retrying cannot help, fail.
  65  `dooly merge` refused to publish a generation with fewer rows than the previous one (EX_DATAERR:
      shards were quarantined or lost); a person must look, so the Job fails without retrying.
  75  transient (EX_TEMPFAIL): the store was unreachable or throttled past the retry deadline;
      the same command later may succeed, so the Job retries that index.
"""

# sysexits.h EX_USAGE-like "bad input" code click also uses, and EX_TEMPFAIL.
EXIT_BAD_INPUT = 2
EXIT_SHRINK_REFUSED = 65
EXIT_TRANSIENT = 75


class DoolyError(Exception):
    """A problem with the user's input or environment (bad config, refused credentials, ...).

    The message is the single line the user sees; keep it specific and actionable.
    """

    exit_code = EXIT_BAD_INPUT


class TransientError(DoolyError):
    """A failure that time may cure (store unreachable, throttled, 5xx, credentials expiring),
    raised once the retries and their deadline are spent; exits 75 so a Job retries it."""

    exit_code = EXIT_TRANSIENT


class ShrinkRefused(DoolyError):
    """A merge whose generation would hold fewer rows than the newest one, not published."""

    exit_code = EXIT_SHRINK_REFUSED
