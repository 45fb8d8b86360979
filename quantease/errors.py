class QuantEaseError(ValueError):
    """A bad input or a condition the user can fix: the CLI prints its message as one line."""
