"""The one exception type a user should ever see from tlray.

Anything the user can fix (a bad path, a malformed file, a wrong option) is raised as a
`TlrayError` with a message that names the file, row or option and what was expected. The CLI
prints these as one line and exits with status 2 instead of a traceback.
"""


class TlrayError(ValueError):
    """A problem with the user's input or environment, explained in the message."""
