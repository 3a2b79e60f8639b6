"""Entry point for ``python -m medfoundry_cli`` (what ``torchrun -m medfoundry_cli`` and SLURM tasks run)."""

from medfoundry_cli.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
