"""Exceptions that the CLI turns into one clear line on stderr and exit code 2."""


class CryowaeInputError(ValueError):
    """Bad user input: a missing or corrupt file, an impossible parameter, NaN voxels...

    The message is meant for the user as it is: one sentence naming the file or option.
    """
