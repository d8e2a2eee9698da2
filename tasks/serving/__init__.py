"""Serving: the HTTP app over one onnxruntime session, model sources, hot reload, micro-batching."""
