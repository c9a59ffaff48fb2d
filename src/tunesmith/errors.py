"""User-facing errors: what the CLI prints as one line per problem, without a traceback."""

from contextlib import contextmanager


class TunesmithError(Exception):
    """A problem with the user's input or environment that the user can fix.

    ``problems`` holds one message per problem, so that a config with several bad fields
    is reported all at once instead of one field per run.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


@contextmanager
def prefixed(where: str):
    """Problems raised inside the block get ``where`` in front: the option or field they concern
    (``ppo.reward: ``), which the code that finds them does not know."""
    try:
        yield
    except TunesmithError as err:
        raise TunesmithError(*(where + p for p in err.problems)) from None
