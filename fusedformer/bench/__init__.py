"""The benchmark harness behind ``fusedformer-bench`` (``python -m fusedformer.bench``).

fusedformer, torch and naive attention measured side by side, interleaved, in one run:

    cases.py     what is measured: each case builds its inputs and, per provider, the timed units
    timing.py    interleaved repeats, warm-up excluded, medians and spread
    memory.py    peak extra memory of one call, in a fresh (forked) process, from VmHWM
    ceilings.py  the machine's GEMM GFLOP/s (per dtype) and copy GB/s, measured at start and end
    runner.py    the run's configuration and the loop that fills one row per case, dtype, mode, provider
    report.py    the text table, the CSV and the Markdown page
    plots.py     the PNGs: time and memory against sequence length, bandwidth of LayerNorm and GELU
    machine.py   the machine (CPU model, AMX/AVX512-BF16/FP16), versions and commit beside every number
"""
