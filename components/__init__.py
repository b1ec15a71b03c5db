"""KFP v2 lightweight components, one per pipeline step.

Folder ``components/``, imported as ``llmneo_components`` (``llmneo_components.X`` is
``components/X.py``); see docs/architecture.md for the one mapping of all four packages.

Thin by design: resolve the configuration, call the matching :data:`llmneo.steps.STEPS` function on the
artifact paths, log metrics. Module tops import only the standard library and kfp; everything heavy
is imported inside the function bodies (they run in the llmneo image).
"""
