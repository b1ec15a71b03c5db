"""Component: registration."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(preset: str, overrides: list, config: str, run_id: str, model: Input[Model], metrics: Output[Metrics],
             registry_uri: str = "") -> str:
    """Upload the merged model and its manifest (sha256 and size of every file, lineage) into the registry.

    The registry is ``registry_uri`` or else registry.uri (s3://bucket/prefix, S3 credentials from the
    pod's environment; a folder only on a mounted volume — refused otherwise, it would be lost); registry.aliases are pointed at the new version; with registry.kubeflow_url set the
    version is also recorded in the Kubeflow Model Registry.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides as key=value strings.
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        run_id: pipeline run id, recorded in the manifest's lineage.
        model: merged model folder from merge-eval.
        metrics: registered size and file count, whether identical content was already registered.
        registry_uri: overrides registry.uri when set (an s3:// URI: the pod's own files go with it).

    Returns:
        NAME:VERSION@URI of the registered model, or "skipped: no s3 registry" when ``registry_uri`` is
        empty and registry.uri is a folder inside this pod (a run started with the defaults): the
        merged model stays in merge-eval's output artifact.
    """
    import time

    from llmneo.cards import register_metrics
    from llmneo.errors import guarded
    from llmneo.steps import register_model
    from llmneo_components.params import (
        REGISTER_SKIPPED,
        check_registry_in_pod,
        load_run_config,
        registry_lasts,
    )

    cfg = load_run_config(preset, overrides, config, [f"registry.uri={registry_uri}"] if registry_uri.strip() else [])
    if not registry_uri.strip() and not registry_lasts(cfg.registry.uri):
        print(f"register: {REGISTER_SKIPPED}: registry.uri={cfg.registry.uri!r} would be a folder inside this pod; "
              f"set the pipeline parameter registry_uri=s3://BUCKET/PREFIX to register (the merged model is "
              f"merge-eval's output artifact)", flush=True)
        metrics.log_metric("registered", 0)
        return REGISTER_SKIPPED
    check_registry_in_pod(cfg.registry.uri)
    t0 = time.time()
    manifest = guarded(register_model, cfg, model.path, run_id)
    for name, value in register_metrics(manifest, time.time() - t0).items():
        metrics.log_metric(name, value)
    return f"{manifest['name']}:{manifest['version']}@{manifest['uri']}"
