"""kfp.local (2.17) resolves ``dsl.OneOf`` for parameters but not for artifacts; the DAG picks the
distill adapter with ``dsl.OneOf`` (one node or a TrainJob). ``install()`` teaches kfp.local's
orchestrator the artifact case the way the KFP backend does it: take the output of whichever branch
ran. Only used by ``llmneo run`` (pipelines/local_run.py); a cluster never runs this code.
"""

from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

_original = OrchestratorUtils.get_dag_output_artifacts.__func__


def _get_dag_output_artifacts(cls, dag_outputs_spec, io_store):
    single = type(dag_outputs_spec)()
    outputs = {}
    for key, spec in dag_outputs_spec.artifacts.items():
        if len(spec.artifact_selectors) == 1:
            single.artifacts[key].CopyFrom(spec)
            continue
        found = []
        for selector in spec.artifact_selectors:  # a OneOf: the branches that did not run have no output
            try:
                found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
            except (KeyError, ValueError):
                continue
        if len(found) != 1:
            raise ValueError(f"dsl.OneOf output {key!r}: expected exactly one branch output, got {len(found)}")
        outputs[key] = found[0]
    return {**_original(cls, single, io_store), **outputs}


def install() -> None:
    OrchestratorUtils.get_dag_output_artifacts = classmethod(_get_dag_output_artifacts)
