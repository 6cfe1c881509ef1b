"""The command line's error classes, in a module of their own.

`python -m study.cli` runs cli.py as `__main__`, a second copy of the module beside the
`study.cli` that other command modules import: a class defined in cli.py would exist twice,
and `main()` of one copy would not catch the other's. Defined here, there is one class.
"""
from __future__ import annotations


class CampaignNotFound(Exception):
    """No campaign of that name in the storage. Here, not in study.worker, so that the
    commands that only read (status, results, figure) need not import torch to catch it."""


class UserError(Exception):
    """A mistake the user can fix (an argument, a path, a campaign name): `batchlab`
    prints `error: <message>` on one line and exits with status 2."""
