"""``python -m pwself_reference.eval {knn,linear,copydays,retrieval} --checkpoint CKPT ...``.

See :mod:`pwself_reference.evaluation.cli` and ``docs/guides/evaluation.rst``.
"""

from pwself_reference.evaluation.cli import build_parser, main

__all__ = ["main", "build_parser"]

if __name__ == "__main__":
    raise SystemExit(main())
