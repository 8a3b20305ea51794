"""Ray Train fine-tuning: the worker loop, DeepSpeed/DDP setup, checkpoints and model export.

Submodules import torch/DeepSpeed lazily; import them directly (``forgetting_ray.train.loop``).
"""
