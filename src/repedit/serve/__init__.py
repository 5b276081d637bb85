"""The playground: one model, one current edit, served to a browser page and a JSON API.

:mod:`repedit.serve.session` holds the state and does the work (no web code);
:mod:`repedit.serve.app` is the FastAPI layer (``pip install 'repedit[serve]'``).
"""
