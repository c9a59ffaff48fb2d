"""Drift monitoring: does the traffic a run serves still look like what it was trained on?
(``tunesmith monitor RUN``: ``drift.py`` wires it; ``stats.py`` holds the tests, ``embed.py`` the
embeddings, ``traffic.py`` the logged prompts, ``report.py`` the report.)"""
