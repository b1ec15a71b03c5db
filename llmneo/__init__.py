"""llmneo: LLM-NEO distillation (a LoRA branch trained on CE + KD, base frozen) as a pipeline.

The library is plain Python + torch and knows nothing of Kubeflow: each pipeline step is a function
in :mod:`llmneo.steps` (table :data:`llmneo.steps.STEPS`) taking local paths and a validated
:class:`llmneo.config.Config`.

Folder ``llmneo/``, imported as ``llmneo`` — the one package whose import name is its folder's. The
others: ``components/`` is ``llmneo_components``, ``pipelines/`` is ``llmneo_pipelines``,
``configs/`` is ``llmneo_presets`` (docs/architecture.md).
"""

__version__ = "0.1.0"
