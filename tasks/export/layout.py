"""The files of an export directory: what the exporter writes and every runtime (the server, Triton) reads.

Kept apart from the exporter so that a reader of exports (``strata serve``) imports these names without
pulling in the exporter's torch, timm and method code.
"""

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.json"
META_FILE = "model.json"
