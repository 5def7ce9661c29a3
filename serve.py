"""Serve the classifier to phones and programs: a web page and an HTTP API on one port.

    python serve.py checkpoints/checkpoint.pth --category_names cat_to_name.json
    python serve.py checkpoints/checkpoint.pth --host 0.0.0.0 --token SECRET   # phones on the Wi-Fi
    curl -F file=@photo.jpg 'http://127.0.0.1:8000/predict?top_k=3'

`GET /` is the page (take or pick a photo, see the top names with bars); `POST /predict` takes a
multipart field `file` or the raw image bytes and answers predict.py --json's object; `GET
/health` and `GET /classes` describe the model. Concurrent requests share one model batch: images
are decoded in threads, never on the event loop, and a worker thread runs the model on whatever
requests are waiting, pausing up to --batch_wait_ms for requests still being decoded.

On a hostile network nothing a client sends can kill, hang or starve it: request headers must
arrive within --header_timeout and a whole request within --request_timeout; open connections,
requests in flight and the memory held for uploads and decoded pixels are capped (503 with
Retry-After when full); only the Host names and web-page origins of this machine are served.
"""
from flower_classifier.cli.runner import run_cli
from flower_classifier.cli.serve import get_args_parser, main

if __name__ == "__main__":
    run_cli(main, get_args_parser())
