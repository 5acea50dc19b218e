"""Errors where the project's guess at a cause may be wrong carry the library's own reason."""

import pytest

from cxr_helpers.evaluation import features
from cxr_helpers.core.errors import CxrError, library_reason


def test_library_reason_keeps_the_mismatch_and_the_wrapped_cause():
    mismatch = RuntimeError("Error(s) in loading state_dict for UNet:\n"
                            "\tsize mismatch for a.weight: [4, 64] vs [4, 32].")
    assert library_reason(mismatch) == "RuntimeError: size mismatch for a.weight: [4, 64] vs [4, 32]."
    try:
        try:
            raise ValueError("header too large")
        except ValueError as inner:
            raise OSError("Unable to load weights from checkpoint file") from inner
    except OSError as outer:
        assert library_reason(outer) == ("OSError: Unable to load weights from checkpoint file "
                                         "(ValueError: header too large)")


def test_an_inception_failure_that_is_not_the_network_says_what_it_is(inception_weights, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(features, "_inception_class", lambda: broken)
    with pytest.raises(CxrError, match=r"could not get the Inception weights .*"
                                       r"\(OSError: \[Errno 28\] No space left on device\)"):
        features.InceptionFeatures(inception_weights)
