"""Multi-process training: start torchrun when a run needs more than one process, and behave inside one.

`launch.py` decides, in the process a person started, whether to re-launch under `python -m torch.distributed.run`
and builds that command. `process_group.py` runs inside each launched process: it joins the process group before
anything touches the output directory, and leaves it cleanly at the end.
"""
