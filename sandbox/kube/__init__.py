"""The sandbox Kubernetes API server: the REST API kubectl and the official client speak, with controllers.

``SandboxCluster.start()`` serves it in-process; ``python -m sandbox.kube`` runs it until interrupted.
"""

from sandbox.kube.cluster import NAMESPACE, SandboxCluster, SandboxError
from sandbox.kube.server import RecordedRequest
from sandbox.kube.timing import Timing

__all__ = ["NAMESPACE", "RecordedRequest", "SandboxCluster", "SandboxError", "Timing"]
