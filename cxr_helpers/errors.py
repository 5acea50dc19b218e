"""The one exception type for mistakes a user can fix.

Every stage raises `CxrError` with one sentence that names the bad value and the fix; the
command line prints that sentence (no traceback) and exits non-zero.
"""


class CxrError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
