"""Component: the sweep's plan (grid → points)."""

from kfp import dsl

from llmneo_components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_sweep(preset: str, overrides: list, config: str, grid: list) -> list:
    """Expand the grid into points, each the complete overrides of one run; every point's configuration is checked.

    Args:
        preset: llmneo preset name (configs/) or YAML path inside the image.
        overrides: configuration overrides shared by every point, as key=value strings.
        config: the resolved configuration as YAML (replaces the preset when set; see llmneo_components.params).
        grid: the swept settings as KEY=V1,V2 strings (cartesian product), e.g. ["distill.alpha=0.5,0.9", "distill.lora_rank=16,64"].

    Returns:
        The points: for each, the overrides list (shared overrides, then the point's settings).
    """
    from llmneo.errors import guarded
    from llmneo.sweep import plan_points
    from llmneo_components.params import load_run_config

    points = guarded(plan_points, list(overrides), list(grid), lambda point: load_run_config(preset, point, config))
    for i, point in enumerate(points, 1):
        print(f"point {i}/{len(points)}: {' '.join(point[len(overrides):]) or '(the base configuration)'}", flush=True)
    return points
