"""The lmforge console: a web page served by the same Ray Serve app as the API (same port, same keys), with a
chat playground for every key and an operators' view for keys with the operator role (lm.serve.auth).

- ``static/``: the page (index.html, console.js, console.css; package data, no build step, no CDN).
- :mod:`lm.serve.console.routes`: its routes on the ingress (the page, ``/v1/console/...``).
- :mod:`lm.serve.console.views`: what the operators' view reads from storage (registry, reports, ledger, curves).
- :mod:`lm.serve.console.stats`: the serving numbers the ingress aggregates itself.
"""
