"""`InputError`: a mistake in what the user passed (a path that holds no readable run, a model
that `gw.gradcheck` cannot differentiate), as opposed to a bug in gradwatch.

The command line reports an `InputError` in one line and exits 2; any other exception keeps its
traceback, so a bug never looks like a usage error.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, with a message that says what was wrong and what to pass instead."""
