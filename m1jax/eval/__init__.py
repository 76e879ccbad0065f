"""Evaluation: RULER-style synthetic long-context tasks (``tasks``) over word vocabularies of token ids or text
(``vocab``), run through the HTTP server, an engine or ``m1jax.generate`` (``runner``)."""
