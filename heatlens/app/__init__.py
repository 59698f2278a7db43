"""The web app of ``heatlens serve``: compare explanations in the browser.

* :mod:`heatlens.app.workbench`: what the page asks the model for (uploads, maps, their
  faithfulness), checked before it is queued and kept while recent;
* :mod:`heatlens.app.jobs`: one computation on the model at a time, with progress and cancel;
* :mod:`heatlens.app.runs`: browsing data-set runs without leaving their folders;
* :mod:`heatlens.app.server`: the FastAPI routes and the page (``static/``).

Needs the ``app`` extra (``pip install 'heatlens[app]'``: FastAPI and uvicorn).
"""
