"""The sandbox Kubernetes API server: the REST API kubectl and the official client speak, with controllers.

``SandboxCluster.start()`` serves it in-process; ``python -m sandbox.kube`` runs it until interrupted.
"""

from sandbox.kube.cluster import NAMESPACE, SandboxCluster, SandboxError
from sandbox.kube.controllers import Timing
from sandbox.kube.server import RecordedRequest

__all__ = ["NAMESPACE", "RecordedRequest", "SandboxCluster", "SandboxError", "Timing"]
