"""The one exception type for mistakes a user can fix.

Every stage raises `CxrError` with one sentence that names the bad value and the fix; the
command line prints that sentence (no traceback) and exits non-zero.
"""


class CxrError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def library_reason(exc: BaseException) -> str:
    """A library's own words for a failure, for a CxrError sentence where the project's guess at
    the cause may be wrong: the first shape mismatch it lists if any, else its first line, then the
    first line of the error it wraps (diffusers wraps safetensors', for one)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = [line for line in lines if line.startswith("size mismatch")]
    reason = f"{type(exc).__name__}: {(mismatch or lines or [''])[0]}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        reason += f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
    return reason[:400]
