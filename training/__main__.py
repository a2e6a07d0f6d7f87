"""``python -m training``: the training command line (see :mod:`training.cli`)."""

from training.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
