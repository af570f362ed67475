"""The one exception type users see for bad configuration or bad input."""


class LightningPeftError(Exception):
    """A user-facing error: the message names the field or file at fault and the fix.

    The CLI prints it as a single ``error: …`` line and exits with status 2, without a traceback.
    """
