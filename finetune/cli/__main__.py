"""`python -m finetune.cli ...` is `ft ...`."""

from finetune.cli import _entry

_entry()
