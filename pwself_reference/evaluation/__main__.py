"""``python -m pwself_reference.evaluation ...``: same as ``python -m pwself_reference.eval``."""

from pwself_reference.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
