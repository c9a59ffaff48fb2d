"""Alignment: PPO against a reward from a tunesmith run (``ppo`` maths, ``rewards``, the ``loop``)."""
