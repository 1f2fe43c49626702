"""`python -m finetune.cli ...` is `ft ...` (how `ft` re-executes itself with a faster BLAS)."""

from finetune.cli import _entry

_entry()
