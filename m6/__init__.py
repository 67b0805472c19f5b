"""m6: pretrain, evaluate and serve M6-style multimodal Mixture-of-Experts models."""

__version__ = "0.1.0"
