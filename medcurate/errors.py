"""The one exception type meant for users: its message is shown as is, without a traceback."""


class MedcurateError(ValueError):
    """Bad input or an impossible request, explained in the message.

    The CLI prints it and exits non-zero; the HTTP service answers it with a 4xx.
    """
