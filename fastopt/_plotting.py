"""matplotlib, when installed, for the PNGs the CLI and the LR range test save."""


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display needed: figures only go to files
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=110):
    """Write ``fig`` to ``path`` and free it; return the path."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
