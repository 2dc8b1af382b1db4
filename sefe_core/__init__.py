"""SEFE library: ASD, RegLoRA, training, evaluation. Usable from a notebook; never imports Prefect."""

__version__ = "0.1.0"
