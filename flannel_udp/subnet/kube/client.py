"""Connecting to the Kubernetes API as upstream's kube subnet manager does (client-go BuildConfigFromFlags):
-kubeconfig-file (its server replaced by -kube-api-url when both are given), else -kube-api-url alone (no credentials),
else the in-cluster service account (KUBERNETES_SERVICE_HOST/PORT, its token and CA).

The client is lightkube (PyPI): maintained, asyncio-native over httpx2 (the continuation of httpx it is built on),
typed models for Node and Pod, strategic-merge patches on subresources, and a watch that we drive ourselves (resume
from a resourceVersion, re-list after 410).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx2
import msgspec
import yaml
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube import ConfigError as LightkubeConfigError
from lightkube.config.models import Cluster, User

from ..registry import StoreError, StoreUnavailable

# Where the kubelet mounts a pod's service-account token, CA and namespace.
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Every request but a watch gives up after this; a watch has no read timeout (it waits for events).
REQUEST_TIMEOUT = 10.0
# Connecting (TCP and the TLS handshake) may take as long as client-go's dialer allows: a busy API server answers
# handshakes late, and a handshake abandoned at 10 s is started again from nothing.
CONNECT_TIMEOUT = 30.0


class KubeConfigError(StoreError):
    """No usable client configuration: a user error, reported as one line."""


@dataclass(frozen=True)
class KubeOptions:
    api_url: str = ""
    kubeconfig_file: str = ""
    annotation_prefix: str = "flannel.alpha.coreos.com"
    set_node_network_unavailable: bool = True


def load_config(opts: KubeOptions) -> KubeConfig:
    prefix = "fail to create kubernetes config"
    if opts.kubeconfig_file:
        return _load_kubeconfig(opts.kubeconfig_file, opts.api_url, prefix)
    if opts.api_url:
        # client-go: a bare URL is a config without credentials (an API server or a `kubectl proxy` that allows it).
        return KubeConfig.from_one(cluster=Cluster(server=opts.api_url), user=User())
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT"):
        try:
            return KubeConfig.from_service_account(SERVICE_ACCOUNT)
        except (LightkubeConfigError, OSError) as e:
            raise KubeConfigError(f"{prefix}: in-cluster service account at {SERVICE_ACCOUNT}: {e}") from None
    raise KubeConfigError(
        f"{prefix}: invalid configuration: no configuration has been provided, try setting "
        "KUBERNETES_MASTER environment variable (give -kubeconfig-file or -kube-api-url, or run "
        "in a pod)"
    )


def _load_kubeconfig(path: str, api_url: str, prefix: str) -> KubeConfig:
    """A kubeconfig file, checked as far as a request would use it; -kube-api-url replaces its server."""
    try:
        with open(path) as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise KubeConfigError(f"{prefix}: cannot read kubeconfig {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise KubeConfigError(f'{prefix}: error loading config file "{path}": {yaml_problem(e)}') from None
    if not document:
        raise KubeConfigError(f"{prefix}: invalid configuration: no configuration has been provided in {path}")
    try:
        if not isinstance(document, dict):
            raise ValueError("not a mapping of clusters, contexts and users")
        config = KubeConfig.from_dict(document, fname=path)
        single = config.get()  # a missing current context or cluster fails here, not at the first request
        if single is None or single.user is None:
            raise ValueError(f"context {config.current_context!r} names no user")
        if api_url:  # client-go: the URL overrides the kubeconfig's server
            cluster_name = single.context.cluster
            config.clusters[cluster_name] = msgspec.structs.replace(config.clusters[cluster_name], server=api_url)
        return config
    except KeyError as e:
        raise KubeConfigError(f"{prefix}: invalid kubeconfig {path}: no {e.args[0]!r}") from None
    except (LightkubeConfigError, TypeError, AttributeError, ValueError) as e:
        raise KubeConfigError(f"{prefix}: invalid kubeconfig {path}: {e}") from None


def yaml_problem(error: Exception) -> str:
    """One line for a file that is not YAML: the problem and where it is."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        where = f" at line {error.problem_mark.line + 1}" if error.problem_mark is not None else ""
        return f"not YAML: {error.problem}{where}"
    return f"not YAML: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


def make_client(config: KubeConfig) -> AsyncClient:
    # trust_env=False: no proxy or ~/.kube/config from the environment; exactly the configuration chosen above.
    # lazy: what still goes through lightkube's models (a patch's answer: the whole Node; the informer's probe) is
    # decoded only as far as it is read. The Node list and watch have a leaner decoder of their own (kube/nodes.py).
    return AsyncClient(
        config, timeout=httpx2.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT), trust_env=False, lazy=True
    )


def describe(error: BaseException) -> str:
    """One line for an API error or a transport failure."""
    if isinstance(error, ApiError):
        return error.status.message or f"HTTP {error.status.code}"
    text = str(error) or type(error).__name__
    return text.splitlines()[0]


def is_unavailable(error: BaseException) -> bool:
    """A failure worth waiting out (the API server restarting or out of reach), as opposed to a refusal."""
    if isinstance(error, ApiError):
        return error.status.code is not None and (error.status.code >= 500 or error.status.code == 429)
    if isinstance(error, httpx2.HTTPStatusError):  # an answer without a Status body, e.g. 429 from max-in-flight
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, (httpx2.TransportError, OSError))


def as_store_error(error: BaseException, what: str) -> StoreError:
    if is_unavailable(error):
        return StoreUnavailable(f"{what}: {describe(error)}")
    return StoreError(f"{what}: {describe(error)}")


async def resolve_node_name(client: AsyncClient) -> str:
    """NODE_NAME, or the spec.nodeName of the pod POD_NAMESPACE/POD_NAME (the DaemonSet's downward API)."""
    from lightkube.resources.core_v1 import Pod

    name = os.environ.get("NODE_NAME", "")
    if name:
        return name
    pod_name, pod_namespace = os.environ.get("POD_NAME", ""), os.environ.get("POD_NAMESPACE", "")
    if not pod_name or not pod_namespace:
        raise KubeConfigError("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)")
    try:
        pod = await client.get(Pod, pod_name, namespace=pod_namespace)
    except (ApiError, httpx2.HTTPError, OSError) as e:
        raise KubeConfigError(f"error retrieving pod spec for '{pod_namespace}/{pod_name}': {describe(e)}") from None
    if not pod.spec or not pod.spec.nodeName:
        raise KubeConfigError(f"node name not present in pod spec '{pod_namespace}/{pod_name}'")
    return pod.spec.nodeName


def node_name(node: Any) -> str:
    """A Node's name ("" if the object has none: lightkube types every field as optional)."""
    return (node.metadata.name if node.metadata is not None else None) or ""


def node_annotations(node: Any) -> dict[str, str]:
    return (node.metadata.annotations if node.metadata is not None else None) or {}
