"""`tunesmith webui`: a browser front end that writes the same YAML the commands take and runs them as subprocesses.

The top layer, beside cli.py: each tab is one module (train_tab, chat_tab, evaluate_tab, export_tab, data_tab) whose
handlers are plain functions, tested without a browser; app.py puts the tabs together; jobs.py runs and watches the
subprocesses; paths.py checks every path typed into the page; locales.py holds the English and Chinese texts.
"""
