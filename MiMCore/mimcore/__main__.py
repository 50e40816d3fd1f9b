"""``python -m mimcore ...`` runs the ``mim`` command line."""

from mimcore.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
