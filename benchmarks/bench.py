"""The benchmark suite as a script: ``python benchmarks/bench.py --quick`` (same as ``triton-lstm bench --quick``).

All of the logic, and ``--help``, live in ``triton_lstm/benchmark.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from triton_lstm.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
