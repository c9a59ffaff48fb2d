"""Gated re-training (``tunesmith retrain RUN``): training data from rated traffic plus replay
(``data.py``), the promotion rule (``gate.py``), and the whole loop (``loop.py``)."""
