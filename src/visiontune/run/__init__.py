"""A run folder and what is done with a finished run: load it, predict, evaluate, export, report."""
