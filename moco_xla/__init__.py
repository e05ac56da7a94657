"""moco_xla: MoCo v1/v2 on TPU cores (PyTorch/XLA), GPUs (NCCL) and CPUs (gloo) behind one interface."""

__version__ = "0.1.0"
