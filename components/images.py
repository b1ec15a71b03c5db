"""Container image references for the components: the one place to change them.

    make images                                   # builds both (images/Dockerfile, images/Dockerfile.cpu)
    LLMNEO_IMAGE=my-registry/llmneo:0.1.0 LLMNEO_CPU_IMAGE=my-registry/llmneo-cpu:0.1.0 make pipeline

``IMAGE`` is the CUDA runtime image (torch 2.13.0 CUDA build + the pinned package): every step that
loads a model. ``CPU_IMAGE`` is the light image without torch: registration and the GitOps schedule
sync (k8s/base/schedule-sync-cronjob.yaml). The tag follows the package version; override both at
compile time with the environment variables (your registry's copy). k8s/ overlays rewrite the
CronJob's image with kustomize ``images:``.

The default names carry no registry host, so a container runtime resolves them on Docker Hub
(``docker.io/llmneo/...``, an account that is not this project's): ``llmneo upload``/``submit`` and
``schedule sync`` refuse a pipeline that still names them, unless ``--image-registry`` (or
``$LLMNEO_IMAGE_REGISTRY``) says where your copies are (see :func:`in_registry`).
"""

import os

VERSION = "0.1.0"  # = [project] version in pyproject.toml (tests/test_images.py checks)
DEFAULT_IMAGE = f"llmneo/llmneo:{VERSION}"
DEFAULT_CPU_IMAGE = f"llmneo/llmneo-cpu:{VERSION}"
IMAGE = os.environ.get("LLMNEO_IMAGE", DEFAULT_IMAGE)
CPU_IMAGE = os.environ.get("LLMNEO_CPU_IMAGE", DEFAULT_CPU_IMAGE)
DEFAULT_IMAGES = (DEFAULT_IMAGE, DEFAULT_CPU_IMAGE)
REGISTRY_ENV = "LLMNEO_IMAGE_REGISTRY"


def in_registry(image: str, registry: str) -> str:
    """A default image's name in ``registry`` (``ghcr.io/team`` → ``ghcr.io/team/llmneo:0.1.0``);
    any other image unchanged."""
    if image not in DEFAULT_IMAGES or not registry:
        return image
    return f"{registry.rstrip('/')}/{image.split('/', 1)[1]}"
