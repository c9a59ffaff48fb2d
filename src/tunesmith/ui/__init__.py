"""``tunesmith ui``: the web UI over runs, training, comparison, chat and rating, served by the same
FastAPI app as ``tunesmith serve`` (``app.add_ui``). Plain HTML, CSS and JavaScript in ``static/``."""
