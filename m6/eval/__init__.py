"""Evaluation: retrieval, captioning, language-modelling and MoE-health metrics, the HTML report and the deployment gate."""
