"""The exception types meant for users: the message is shown as is, without a traceback;
the subclasses only tell the HTTP service which 4xx to answer."""


class MedcurateError(ValueError):
    """Bad input or an impossible request, explained in the message.

    The CLI prints it and exits non-zero; the HTTP service answers it with a 4xx.
    """


class NotFound(MedcurateError):
    """The request names an artefact that does not exist (the HTTP service answers 404)."""


class AlreadyExists(MedcurateError):
    """The artefact to write exists and no overwrite was asked for (the HTTP service answers
    409): also what the later of two concurrent writers of one key gets."""
