"""The command line: ``fastopt bench``, ``fastopt bench --torch`` and ``fastopt demo``.

The top layer: it may import everything below it, and nothing in the
library imports it (``import fastopt`` loads none of it). Each command's
module keeps its public path, ``fastopt.bench``, ``fastopt.bench_torch``
and ``fastopt.demo`` (the same module objects); ``measure`` holds what the
two benches share.
"""
