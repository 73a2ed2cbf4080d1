"""The relabeller's one error type, in a module of its own so that every part of ``relabel/`` can
raise it without importing another part."""


class RelabelError(ValueError):
    """Bad input or flags for the relabeller; the message names the file or flag."""
