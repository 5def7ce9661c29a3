"""Serving a model over HTTP: the app (page and API), its frozen configuration, the batcher, the
memory budget, upload parsing and the guards every page of ours shares (limits, timeouts,
Host/Origin checks, security headers)."""
