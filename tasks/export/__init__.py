"""Export: a method's inference graph to ONNX (parity-gated), registered versions ⇄ exports, Triton."""
