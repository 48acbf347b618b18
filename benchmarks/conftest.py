"""Shared set-up of the pytest-benchmark suites: the same cases as ``fusedformer-bench``.

    pytest benchmarks/                                  # small sizes, timed
    FUSEDFORMER_BENCH_SIZE=large pytest benchmarks/     # the sizes worth reading
    pytest benchmarks/ --benchmark-disable              # each body once, untimed: what `make test` runs

Each test times one provider (``fusedformer``, ``torch``, ``naive``) in one mode (``fwd``, ``bwd``,
``fwd+bwd``) on one shape, with ``benchmark.pedantic``: the untimed setup before every round builds a
fresh graph for ``bwd``. Tests of one shape and mode share a ``group``, so pytest-benchmark's table
puts the providers side by side. ``extra_info`` records the backend that served fusedformer and the
FLOP or byte count of one call; a case where fusedformer would fall back to the reference path fails
instead of recording the reference's time under fusedformer's name.

Unlike ``fusedformer-bench``, the tests do not interleave providers: for ratios measured side by
side, use the command.
"""
