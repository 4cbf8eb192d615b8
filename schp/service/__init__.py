"""An HTTP service over the one parsing engine: a FastAPI app (app.py), the batcher that gathers
concurrent requests into one forward pass (batcher.py), the page at / (static/), and the command
that starts it on uvicorn (command.py, run by serve.py). FastAPI and uvicorn are an optional extra:
importing this package needs neither."""

DEFAULT_MAX_BYTES = 20 << 20  # a 20 MiB body: larger than any photo a phone takes
DEFAULT_MAX_PIXELS = 50_000_000  # 150 MB decoded; the extractor's 200 M is for trusted files
