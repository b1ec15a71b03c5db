"""What a step does inside a Kubeflow pod when the cluster set-up is incomplete: one ``error:`` line
naming what is missing, never a silent fallback."""

import pytest

from llmneo.errors import UserError
from llmneo.storage.s3 import S3Store, check_pod_credentials

POD = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}


def test_s3_in_a_pod_without_the_secret_fails_in_one_line(monkeypatch):
    """Upstream rule: the pipeline mounts llmneo-s3 with ``optional: true`` (kfp-kubernetes
    use_secret_as_env → the pod's secretKeyRef.optional), so a missing Secret gives a pod without the
    variables, and botocore's chain (botocore/credentials.py create_credential_resolver) then falls
    through to the container provider and InstanceMetadataProvider: the node's IAM role on EKS. The
    step refuses before the first call instead."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(UserError, match=r"^registry.uri: no S3 credentials in this pod: the Secret llmneo-s3 "
                                        r"\(keys AWS_ACCESS_KEY_ID, .*kubectl create secret generic llmneo-s3"):
        S3Store("s3://models/registry", "registry.uri").list()


@pytest.mark.parametrize("env", [
    {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},     # the Secret llmneo-s3
    {"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"},  # IRSA
    {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials"},  # EKS Pod Identity
])
def test_pod_credentials_of_the_pods_own_are_accepted(env):
    check_pod_credentials("x", {**POD, **env})


def test_half_a_key_pair_or_no_pod_is_judged_right():
    with pytest.raises(UserError, match="no S3 credentials in this pod"):
        check_pod_credentials("x", {**POD, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": ""})
    check_pod_credentials("x", {})  # outside Kubernetes: botocore's chain as usual (profiles, SSO...)
