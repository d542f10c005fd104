"""One module per ``visiontune`` sub-command; each exposes ``register(subparsers)``."""
