"""`python -m tunesmith.train CONFIG.yaml [key=value ...]`: the same as `tunesmith train`, for torchrun's `-m`:
`torchrun --nproc_per_node 2 -m tunesmith.train cfg.yaml`.

`record` writes an uncaught exception to the file torchrun names, so torchrun's failure summary shows the failing
rank's error and traceback instead of only its exit code.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from tunesmith.cli import main

raise SystemExit(record(main)(["train", *sys.argv[1:]]))
