"""`tunesmith chat`: a streaming generation engine (engine.py) and the interactive command (command.py)."""
