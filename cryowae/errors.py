"""Exceptions that the CLI turns into one clear line on stderr and exit code 2."""


class CryowaeInputError(ValueError):
    """Bad user input: a missing or corrupt file, an impossible parameter, NaN voxels...

    The message is meant for the user as it is: one sentence naming the file or option.
    """


def require_int(value: object, name: str, low: int = 1, high: int | None = None) -> int:
    """`value` if it is an integer (not a bool) in ``[low, high]``, else raise
    `CryowaeInputError` naming the setting: the one check behind every integer setting of
    the configuration dataclasses."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]
    if not ok:
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise CryowaeInputError(f"{name} must be an integer {span}, got {value!r}")
    return value  # type: ignore[return-value]
