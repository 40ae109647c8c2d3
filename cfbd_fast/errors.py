"""The exceptions cfbd-fast raises on purpose; the CLI turns each into a one-line error."""


class CfbdError(Exception):
    """Base class: an error the user can act on (bad input, wrong file, bad option)."""


class StoreFormatError(CfbdError, ValueError):
    """A store file is missing, truncated, corrupt, or of another format/version. Message names the file."""


class InputError(CfbdError, ValueError):
    """Arguments or input data that cfbd-fast cannot use; the message says what to do."""


class MapperMismatchError(CfbdError, ValueError):
    """A mapping network made for another embedding model or dimension."""
