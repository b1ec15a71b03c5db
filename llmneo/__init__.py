"""llmneo: LLM-NEO distillation (a LoRA branch trained on CE + KD, base frozen) as a pipeline.

The library is plain Python + torch and knows nothing of Kubeflow: each pipeline step is a function
in :mod:`llmneo.steps` taking local paths and a validated :class:`llmneo.config.Config`.
"""

__version__ = "0.1.0"
