"""Beside the flow: checking a grown model. ``compare`` (the one measure of two outputs),
``verify`` (torch and onnxruntime checks), ``onnx_export`` and ``guard`` (``grow``'s last
check on the example inputs). Imported by the api and the CLI only."""
