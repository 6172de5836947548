"""Session-wide checks before any test module is imported."""
import pytest

try:
    import fastopt  # noqa: F401
except ImportError as exc:
    # `python -m pytest` from a checkout's root puts the unbuilt source tree
    # first on sys.path: say so once, instead of one collection error per module.
    if "source tree" not in str(exc):
        raise
    pytest.exit(f"{exc}\n(plain `pytest` from the root tests the installed fastopt)", returncode=4)
