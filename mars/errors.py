"""One-line error reasons: bad input anywhere in MARS ends in a single line that says what to do."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
