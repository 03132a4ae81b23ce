"""Training command line: ``python -m train --help``."""
