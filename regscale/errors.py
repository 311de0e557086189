"""Errors a user can fix: the CLI prints their message as one line and exits 2."""


class UserError(RuntimeError):
    """Bad input (a path, a shard, a checkpoint, a cluster answer) with a message naming it."""
