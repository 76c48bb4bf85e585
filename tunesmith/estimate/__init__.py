"""`tunesmith estimate`: the peak memory of a run, predicted before anything is downloaded or loaded."""
