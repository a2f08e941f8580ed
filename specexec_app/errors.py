class UserError(Exception):
    """A problem with the user's input or machine, shown as one line without a traceback."""
