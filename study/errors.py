"""The command line's user-error class, in a module of its own.

`python -m study.cli` runs cli.py as `__main__`, a second copy of the module beside the
`study.cli` that other command modules import: a class defined in cli.py would exist twice,
and `main()` of one copy would not catch the other's. Defined here, there is one class.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (an argument, a path, a campaign name): `batchlab`
    prints `error: <message>` on one line and exits with status 2."""
