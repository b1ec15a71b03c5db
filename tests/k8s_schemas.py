"""Validate generated custom resources against the real CRD schemas in ../shared/schemas/.

The API server prunes or (with strict field validation) rejects fields a structural schema does not
declare; plain JSON Schema allows them. ``strict`` closes every object that lists ``properties``
(unless it is marked ``x-kubernetes-preserve-unknown-fields``) so a misspelt field fails here too.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# beside the repository; $LLMNEO_SCHEMAS points elsewhere (e.g. from a git worktree)
SCHEMAS = Path(os.environ.get("LLMNEO_SCHEMAS") or REPO.parent / "shared" / "schemas")
TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"


def strict(schema: dict) -> dict:
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_validator(filename: str, version: str):
    """A jsonschema validator for one CRD version, or skip when the schemas folder is absent."""
    import jsonschema

    path = Path(SCHEMAS) / filename
    if not path.is_file():
        pytest.skip(f"{path} not found: the CRD schemas live in the shared folder beside the repository")
    crd = yaml.safe_load(path.read_text())
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(ver["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def errors(validator, obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
