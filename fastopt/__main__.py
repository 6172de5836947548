"""Command line: ``fastopt bench|demo [options]`` or ``fastopt --version``.

``python -m fastopt ...`` is the same program (from any folder but a source
checkout's root, whose unbuilt ``fastopt/`` would shadow the installed one).
"""
import sys

from ._version import __version__

USAGE = """usage: fastopt {bench,demo,--version} [options]   (or: python -m fastopt ...)

  bench      time fastopt's optimizer step against the NumPy reference
             (and torch.optim when installed); --help for its options
  demo       train one model with GD, SGD, mini-batch, momentum, RMSProp and
             Adam, and show momentum and learning-rate choices at work
  --version  print fastopt's version
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fastopt {__version__}")
        return 0
    if argv[0] == "bench":
        from ._cli import bench
        return bench.run(argv[1:])
    if argv[0] == "demo":
        from ._cli import demo
        return demo.run(argv[1:])
    print(f"unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
