"""KFP v2 lightweight components, one per pipeline step (installed as ``llmneo_components``).

Thin by design: resolve the configuration, call the matching :mod:`llmneo.steps` function on the
artifact paths, log metrics. Module tops import only the standard library and kfp; everything heavy
is imported inside the function bodies (they run in the llmneo image).
"""
