"""The one exception type that the ``bnbook`` command reports as a one-line error."""


class BnbookError(Exception):
    """Bad input or an unmet precondition, with a message that names the problem.

    The CLI prints ``bnbook: error: <message>`` and exits with status 2; library
    code raises it (or a subclass) wherever a user can fix the cause.
    """


class DeviceError(BnbookError):
    """A device was asked for that this machine does not have."""


class DatasetError(BnbookError):
    """A dataset is unknown, missing, or failed its checksum."""
