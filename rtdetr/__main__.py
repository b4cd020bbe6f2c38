"""``python -m rtdetr ...`` is the ``rtdetr`` command (see :mod:`rtdetr.cli`)."""
from rtdetr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
