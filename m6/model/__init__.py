"""The M6 model: MoE layer, transformer with sharing/delinking, multimodal model, parameter counts."""
