"""Compare precision recipes side by side: the script form of ``hybrid-jax bench``.

Runs the same GPT, data and seed under each recipe, interleaved, and writes a table,
``results.json``, ``results.csv`` and PNG plots (see ``benchmarks/README.md`` for the columns).

    python benchmarks/compare_dtypes.py --quick --out bench-quick
    python benchmarks/compare_dtypes.py --recipes fp32,bf16-mixed,fp8-mixed --steps 500

Flags are ``hybrid-jax bench``'s: ``--recipes a,b,c``, ``--quick``, ``--steps``, ``--out``.
"""

import sys

from hybrid_jax.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
