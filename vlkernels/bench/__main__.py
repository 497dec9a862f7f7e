"""python -m vlkernels.bench: the same as the vlkernels-bench console script."""
from vlkernels.bench.cli import main

raise SystemExit(main())
