"""The llmneo KFP pipeline (installed as ``llmneo_pipelines``): the DAG and its local runner."""
