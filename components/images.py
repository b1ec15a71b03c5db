"""Container image references for the components: the one place to change them.

Override at compile time with LLMNEO_IMAGE (e.g. your registry's copy); `make images` builds it.
"""

import os

DEFAULT_IMAGE = "llmneo/llmneo:0.1.0"
IMAGE = os.environ.get("LLMNEO_IMAGE", DEFAULT_IMAGE)
