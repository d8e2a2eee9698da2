"""Pure PyTorch: backbones, PET modules, heads, methods, the training engine, streams, metrics.

Nothing here touches a store or imports from ``tasks``/``flows``.
"""
