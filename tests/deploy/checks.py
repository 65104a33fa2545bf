"""The chart's security posture checked on rendered manifests, beside checkov.

checkov finds a missing readOnlyRootFilesystem or capabilities drop, but has no rule for a
missing NetworkPolicy, and none that insists on every Pod Security "restricted" field at once.
``restricted_problems`` states those rules; the tests run it on the rendered chart, and on
rendered output with a field removed to show that it notices.
"""

from __future__ import annotations

from typing import Any

import yaml

Doc = dict[str, Any]

_WORKLOADS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}


def load(text: str) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def _container_problems(where: str, container: Doc, pod_ctx: Doc) -> list[str]:
    ctx: Doc = container.get("securityContext") or {}
    problems = []
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if ctx.get("privileged"):
        problems.append(f"{where}: privileged")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem is not true")
    capabilities = ctx.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append(f"{where}: capabilities are not dropped (drop: [ALL])")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"{where}: adds capabilities")
    if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
        problems.append(f"{where}: runAsNonRoot is not set")
    if (ctx.get("runAsUser", pod_ctx.get("runAsUser")) or 0) == 0:
        problems.append(f"{where}: no fixed non-root UID")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: no seccompProfile RuntimeDefault")
    return problems


def restricted_problems(docs: list[Doc]) -> list[str]:
    """Everything in ``docs`` that falls short of the chart's posture; [] when none does."""
    problems: list[str] = []
    workloads = [d for d in docs if d.get("kind") in _WORKLOADS]
    if not workloads:
        problems.append("no workload rendered")
    for doc in workloads:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = _pod_spec(doc)
        pod_ctx: Doc = spec.get("securityContext") or {}
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: the service account token is mounted")
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(host):
                problems.append(f"{name}: {host}")
        if any("hostPath" in volume for volume in spec.get("volumes") or []):
            problems.append(f"{name}: hostPath volume")
        for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
            problems += _container_problems(f"{name}/{container['name']}", container, pod_ctx)
    for doc in (d for d in docs if d.get("kind") == "Deployment"):
        problems += _network_policy_problems(docs, doc)
    return problems


def _network_policy_problems(docs: list[Doc], deployment: Doc) -> list[str]:
    """A NetworkPolicy must select the pods, deny both ways by default and open only 8443."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    policies = [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and d["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]
    if not policies:
        return [f"Deployment/{deployment['metadata']['name']}: no NetworkPolicy selects its pods"]
    problems = []
    for policy in policies:
        spec = policy["spec"]
        if set(spec.get("policyTypes") or []) != {"Ingress", "Egress"}:
            problems.append("NetworkPolicy: not default-deny for both ingress and egress")
        for rule in spec.get("ingress") or []:
            ports = {p.get("port") for p in rule.get("ports") or []}
            if ports != {8443} or not rule.get("from"):
                problems.append("NetworkPolicy: an ingress rule beyond 8443 from chosen peers")
        for rule in spec.get("egress") or []:
            if not rule.get("to") or not rule.get("ports"):
                problems.append("NetworkPolicy: an egress rule to anywhere or on any port")
    return problems
