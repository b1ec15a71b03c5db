"""The llmneo KFP pipeline: the DAG, its local runner, the Kubeflow client commands and the
``llmneo`` console script (``cli.py``).

Folder ``pipelines/``, imported as ``llmneo_pipelines`` (``llmneo_pipelines.X`` is
``pipelines/X.py``); see docs/architecture.md for the one mapping of all four packages.
"""
