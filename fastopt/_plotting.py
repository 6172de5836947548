"""matplotlib, when installed, for the PNGs the CLI and the LR range test save."""
import os

INSTALL_HINT = 'pip install "fastopt[plot]"'


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display needed: figures only go to files
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=110, rect=None):
    """Write ``fig`` to ``path`` and free it; return the path.

    ``rect`` (left, bottom, right, top in figure fractions) keeps the panels
    out of a figure-level legend or title above them.
    """
    plt = pyplot()
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def missing_line(path=None):
    """The one line the command line prints when matplotlib is missing.

    Parameters
    ----------
    path : str, optional
        The figure that was not written; named (absolute) so that a user who
        asked for it with ``--plot`` sees which file will not appear.

    Returns
    -------
    str
    """
    where = f" ({os.path.abspath(path)} not written)" if path else ""
    return f"no plot{where}: matplotlib is not installed ({INSTALL_HINT})"
