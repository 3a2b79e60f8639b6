"""Entry point for ``python -m medfoundry`` (used by ``torchrun -m medfoundry``)."""

from medfoundry.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
