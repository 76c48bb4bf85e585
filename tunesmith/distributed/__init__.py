"""Multi-process training: start torchrun when a run needs more than one process, and behave inside one.

`launch.py` decides, in the process a person started, whether to re-launch under `python -m torch.distributed.run`
and builds that command. `process_group.py` runs inside each launched process: it joins the process group before
anything touches the output directory, tells the recipe whether the nodes share that directory and which process
writes it, and leaves the group cleanly at the end. This package sits below train/ and never imports it.
"""
