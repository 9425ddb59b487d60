"""Checks of what the Kubernetes OpenAPI schema lets through but the API server (or a kubelet) rejects.

The schema says a name is a string and a quantity is a string; the API server then refuses
`Profile_H100` as a name, `8GB` as a quantity or `Always` as a Job's restart policy, and it does so
one object at a time, after earlier objects were already created. We run these checks on every
manifest before the first API call, so a bad fleet file fails whole, on the laptop, with one line.
They also guard the security posture we promise: pinned images, non-root pods, no inline secrets,
no cluster-wide permissions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from dooly.errors import DoolyError

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
LABEL_VALUE_MAX = 63
# The CronJob controller appends an 11-character suffix to the Jobs it creates.
CRONJOB_NAME_MAX = 52
# Exit codes a container can report; podFailurePolicy rules must name at most this many.
EXIT_CODE_MAX = 255
EXIT_CODES_PER_RULE_MAX = 255
CRON_FIELDS = 5

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?]+$")
# registry[:port]/path[:tag][@sha256:digest]; the path is lowercase by the distribution spec.
_IMAGE = re.compile(
    r"^(?P<name>[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_SECRETISH_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.IGNORECASE)

RESTART_POLICIES_FOR_JOBS = ("Never", "OnFailure")
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
COMPLETION_MODES = ("NonIndexed", "Indexed")
POD_FAILURE_ACTIONS = ("FailJob", "FailIndex", "Ignore", "Count")
EXIT_CODE_OPERATORS = ("In", "NotIn")
CONCURRENCY_POLICIES = ("Allow", "Forbid", "Replace")
TOLERATION_OPERATORS = ("Exists", "Equal")
TOLERATION_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
CONDITION_STATUSES = ("True", "False", "Unknown")
RBAC_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
# Resources a namespaced Role must never grant us: we read no secrets and touch nothing cluster-wide.
FORBIDDEN_RBAC_RESOURCES = ("secrets", "namespaces", "nodes", "clusterroles", "clusterrolebindings")
CLUSTER_SCOPED_KINDS = ("Namespace",)
FORBIDDEN_KINDS = ("ClusterRole", "ClusterRoleBinding")
EXTENDED_RESOURCE_PREFIX = "nvidia.com/"


def is_dns1123_label(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= DNS1123_LABEL_MAX and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: Any) -> bool:
    if not isinstance(value, str) or not value or len(value) > DNS1123_SUBDOMAIN_MAX:
        return False
    return all(_DNS1123_LABEL.match(part) for part in value.split("."))


def is_label_key(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    prefix, _, name = value.rpartition("/")
    if prefix and not is_dns1123_subdomain(prefix):
        return False
    return len(name) <= DNS1123_LABEL_MAX and bool(_LABEL_NAME.match(name))


def is_label_value(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > LABEL_VALUE_MAX:
        return False
    return value == "" or bool(_LABEL_NAME.match(value))


def is_quantity(value: Any) -> bool:
    return isinstance(value, str) and bool(_QUANTITY.match(value))


def image_problem(image: Any) -> str | None:
    """Why an image reference is unusable or unpinned, or None when it is pinned by tag or digest."""
    if not isinstance(image, str) or not image:
        return "image reference is empty"
    match = _IMAGE.match(image)
    if match is None:
        return f"image reference {image!r} is malformed"
    if match.group("digest"):
        return None
    tag = match.group("tag")
    if not tag:
        return f"image {image!r} has no tag or digest (pin a version or sha256 digest)"
    if tag == "latest":
        return f"image {image!r} uses the floating tag 'latest' (pin a version or sha256 digest)"
    return None


def slug(value: str) -> str:
    """A DNS-1123 label fragment for a free-form value such as `paged|sdpa` or `FLASH_ATTN`."""
    return re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")


def check_manifests(manifests: Iterable[dict]) -> list[str]:
    """Every problem found in these manifests, each as `Kind/name: where: what`."""
    problems: list[str] = []
    for manifest in manifests:
        kind = manifest.get("kind", "?")
        name = (manifest.get("metadata") or {}).get("name", "?")
        problems.extend(f"{kind}/{name}: {p}" for p in _check_object(manifest))
    return problems


def require_valid(manifests: Iterable[dict]) -> None:
    """Raise one DoolyError naming the first problem (and how many there are) if any manifest is bad."""
    problems = check_manifests(manifests)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DoolyError(f"invalid manifest: {problems[0]}{more}")


def _check_object(obj: dict) -> Iterator[str]:
    kind = obj.get("kind")
    if kind in FORBIDDEN_KINDS:
        yield f"kind {kind} grants cluster-wide rights; dooly needs only a namespaced Role"
        return
    metadata = obj.get("metadata") or {}
    yield from _check_metadata(metadata, namespaced=kind not in CLUSTER_SCOPED_KINDS)
    name = metadata.get("name", "")
    if kind == "Job":
        if isinstance(name, str) and len(name) > DNS1123_LABEL_MAX:
            yield f"metadata.name: a Job name is a pod label value, at most {DNS1123_LABEL_MAX} characters"
        yield from _check_job_spec(obj.get("spec") or {}, "spec")
    elif kind == "CronJob":
        if isinstance(name, str) and len(name) > CRONJOB_NAME_MAX:
            yield f"metadata.name: a CronJob name is at most {CRONJOB_NAME_MAX} characters"
        yield from _check_cronjob_spec(obj.get("spec") or {})
    elif kind == "Role":
        yield from _check_role(obj)
    elif kind == "RoleBinding":
        yield from _check_role_binding(obj)


def _check_metadata(metadata: dict, *, namespaced: bool, where: str = "metadata") -> Iterator[str]:
    name = metadata.get("name")
    if name is not None and not is_dns1123_subdomain(name):
        yield f"{where}.name: {name!r} is not a DNS-1123 name (lowercase letters, digits, '-', '.')"
    if namespaced and "namespace" in metadata and not is_dns1123_label(metadata["namespace"]):
        yield f"{where}.namespace: {metadata['namespace']!r} is not a DNS-1123 label"
    if not namespaced and "namespace" in metadata:
        yield f"{where}.namespace: a cluster-scoped object has no namespace"
    for key, value in (metadata.get("labels") or {}).items():
        if not is_label_key(key):
            yield f"{where}.labels: key {key!r} is not a valid label key"
        if not is_label_value(value):
            yield f"{where}.labels[{key}]: value {value!r} is not a valid label value"
    for key, value in (metadata.get("annotations") or {}).items():
        if not is_label_key(key):
            yield f"{where}.annotations: key {key!r} is not a valid annotation key"
        if not isinstance(value, str):
            yield f"{where}.annotations[{key}]: value must be a string"


def _check_job_spec(spec: dict, where: str) -> Iterator[str]:
    mode = spec.get("completionMode", "NonIndexed")
    if mode not in COMPLETION_MODES:
        yield f"{where}.completionMode: {mode!r} is not one of {', '.join(COMPLETION_MODES)}"
    for field in ("completions", "parallelism", "backoffLimit", "backoffLimitPerIndex", "maxFailedIndexes",
                  "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        value = spec.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            yield f"{where}.{field}: must be a non-negative integer, got {value!r}"
    if spec.get("activeDeadlineSeconds") == 0:
        yield f"{where}.activeDeadlineSeconds: must be positive"
    completions, parallelism = spec.get("completions"), spec.get("parallelism")
    if isinstance(completions, int) and isinstance(parallelism, int) and parallelism > completions:
        yield f"{where}.parallelism: {parallelism} exceeds completions {completions}"
    if "backoffLimitPerIndex" in spec and mode != "Indexed":
        yield f"{where}.backoffLimitPerIndex: needs completionMode Indexed"
    if mode == "Indexed" and not isinstance(completions, int):
        yield f"{where}.completions: an Indexed Job needs completions"
    template = spec.get("template") or {}
    pod_spec = template.get("spec") or {}
    yield from _check_metadata(template.get("metadata") or {}, namespaced=True, where=f"{where}.template.metadata")
    restart = pod_spec.get("restartPolicy")
    if restart not in RESTART_POLICIES_FOR_JOBS:
        yield f"{where}.template.spec.restartPolicy: {restart!r} is not one of {', '.join(RESTART_POLICIES_FOR_JOBS)}"
    policy = spec.get("podFailurePolicy")
    if policy is not None:
        if restart != "Never":
            yield f"{where}.podFailurePolicy: needs restartPolicy Never"
        yield from _check_pod_failure_policy(policy, f"{where}.podFailurePolicy", "backoffLimitPerIndex" in spec)
    yield from _check_pod_spec(pod_spec, f"{where}.template.spec")


def _check_pod_failure_policy(policy: dict, where: str, per_index: bool) -> Iterator[str]:
    for i, rule in enumerate(policy.get("rules") or []):
        at = f"{where}.rules[{i}]"
        action = rule.get("action")
        if action not in POD_FAILURE_ACTIONS:
            yield f"{at}.action: {action!r} is not one of {', '.join(POD_FAILURE_ACTIONS)}"
        if action == "FailIndex" and not per_index:
            yield f"{at}.action: FailIndex needs backoffLimitPerIndex"
        exit_codes, conditions = rule.get("onExitCodes"), rule.get("onPodConditions")
        if (exit_codes is None) == (conditions is None):
            yield f"{at}: give exactly one of onExitCodes and onPodConditions"
        if exit_codes is not None:
            operator = exit_codes.get("operator")
            values = exit_codes.get("values") or []
            if operator not in EXIT_CODE_OPERATORS:
                yield f"{at}.onExitCodes.operator: {operator!r} is not one of {', '.join(EXIT_CODE_OPERATORS)}"
            if not values or len(values) > EXIT_CODES_PER_RULE_MAX or len(set(values)) != len(values):
                yield f"{at}.onExitCodes.values: needs 1..{EXIT_CODES_PER_RULE_MAX} distinct exit codes"
            if any(not isinstance(v, int) or v < 0 or v > EXIT_CODE_MAX for v in values):
                yield f"{at}.onExitCodes.values: exit codes are integers 0..{EXIT_CODE_MAX}"
            if operator == "In" and 0 in values:
                yield f"{at}.onExitCodes.values: operator In cannot match exit code 0"
        for j, condition in enumerate(conditions or []):
            if condition.get("status", "True") not in CONDITION_STATUSES:
                yield f"{at}.onPodConditions[{j}].status: not one of {', '.join(CONDITION_STATUSES)}"


def _check_cronjob_spec(spec: dict) -> Iterator[str]:
    policy = spec.get("concurrencyPolicy", "Allow")
    if policy not in CONCURRENCY_POLICIES:
        yield f"spec.concurrencyPolicy: {policy!r} is not one of {', '.join(CONCURRENCY_POLICIES)}"
    schedule = spec.get("schedule", "")
    fields = schedule.split() if isinstance(schedule, str) else []
    if not (schedule.startswith("@") or (len(fields) == CRON_FIELDS and all(_CRON_FIELD.match(f) for f in fields))):
        yield f"spec.schedule: {schedule!r} is not a {CRON_FIELDS}-field cron expression"
    job_template = spec.get("jobTemplate") or {}
    yield from _check_metadata(job_template.get("metadata") or {}, namespaced=True, where="spec.jobTemplate.metadata")
    yield from _check_job_spec(job_template.get("spec") or {}, "spec.jobTemplate.spec")


def _check_pod_spec(pod: dict, where: str) -> Iterator[str]:
    volumes = {}
    for i, volume in enumerate(pod.get("volumes") or []):
        name = volume.get("name")
        if not is_dns1123_label(name) or name in volumes:
            yield f"{where}.volumes[{i}].name: {name!r} is not a unique DNS-1123 label"
        volumes[name] = volume
    for key, value in (pod.get("nodeSelector") or {}).items():
        if not is_label_key(key) or not is_label_value(value):
            yield f"{where}.nodeSelector: {key}={value} is not a valid label selector"
    for i, toleration in enumerate(pod.get("tolerations") or []):
        operator = toleration.get("operator", "Equal")
        if operator not in TOLERATION_OPERATORS:
            yield f"{where}.tolerations[{i}].operator: {operator!r} is not one of {', '.join(TOLERATION_OPERATORS)}"
        if toleration.get("effect", "") not in TOLERATION_EFFECTS:
            yield f"{where}.tolerations[{i}].effect: {toleration.get('effect')!r} is not a taint effect"
        if operator == "Exists" and toleration.get("value"):
            yield f"{where}.tolerations[{i}]: operator Exists takes no value"
    pod_security = pod.get("securityContext") or {}
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        yield f"{where}.securityContext: pods run as a non-root numeric user (runAsNonRoot, runAsUser > 0)"
    names: set[str] = set()
    containers = [("initContainers", c) for c in pod.get("initContainers") or []]
    containers += [("containers", c) for c in pod.get("containers") or []]
    if not pod.get("containers"):
        yield f"{where}.containers: a pod needs at least one container"
    for field, container in containers:
        name = container.get("name")
        at = f"{where}.{field}[{name}]"
        if not is_dns1123_label(name) or name in names:
            yield f"{at}.name: {name!r} is not a unique DNS-1123 label"
        names.add(name)
        yield from _check_container(container, at, volumes)


def _check_container(container: dict, where: str, volumes: dict) -> Iterator[str]:
    problem = image_problem(container.get("image"))
    if problem:
        yield f"{where}.image: {problem}"
    pull = container.get("imagePullPolicy", "IfNotPresent")
    if pull not in IMAGE_PULL_POLICIES:
        yield f"{where}.imagePullPolicy: {pull!r} is not one of {', '.join(IMAGE_PULL_POLICIES)}"
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for section, values in (("requests", requests), ("limits", limits)):
        for resource, quantity in values.items():
            if not is_quantity(quantity):
                yield f"{where}.resources.{section}.{resource}: {quantity!r} is not a Kubernetes quantity"
    for resource, quantity in requests.items():
        if resource.startswith(EXTENDED_RESOURCE_PREFIX) and limits.get(resource) != quantity:
            yield f"{where}.resources: extended resource {resource} needs requests equal to limits"
    for resource in limits:
        if resource.startswith(EXTENDED_RESOURCE_PREFIX) and not str(limits[resource]).isdigit():
            yield f"{where}.resources.limits.{resource}: extended resources are whole numbers"
    seen: set[str] = set()
    for env in container.get("env") or []:
        name = env.get("name", "")
        if not _ENV_NAME.match(name) or name in seen:
            yield f"{where}.env: {name!r} is not a unique environment variable name"
        seen.add(name)
        if "value" in env and "valueFrom" in env:
            yield f"{where}.env[{name}]: give value or valueFrom, not both"
        if "value" in env and _SECRETISH_ENV.search(name):
            yield f"{where}.env[{name}]: credentials come from a Secret (valueFrom.secretKeyRef), never inline"
        sources = env.get("valueFrom") or {}
        if "valueFrom" in env and len(sources) != 1:
            yield f"{where}.env[{name}].valueFrom: give exactly one source"
    for mount in container.get("volumeMounts") or []:
        if mount.get("name") not in volumes:
            yield f"{where}.volumeMounts: volume {mount.get('name')!r} is not declared in the pod"
    security = container.get("securityContext") or {}
    if security.get("allowPrivilegeEscalation") is not False:
        yield f"{where}.securityContext.allowPrivilegeEscalation: must be false"
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        yield f"{where}.securityContext.capabilities: drop ALL"
    if security.get("privileged"):
        yield f"{where}.securityContext.privileged: dooly pods are never privileged"


def _check_role(role: dict) -> Iterator[str]:
    for i, rule in enumerate(role.get("rules") or []):
        for verb in rule.get("verbs") or []:
            if verb not in RBAC_VERBS:
                yield f"rules[{i}].verbs: {verb!r} is not an allowed verb (wildcards are not least privilege)"
        for resource in rule.get("resources") or []:
            if resource == "*" or resource.split("/")[0] in FORBIDDEN_RBAC_RESOURCES:
                yield f"rules[{i}].resources: {resource!r} is more than dooly needs"
        if "*" in (rule.get("apiGroups") or []):
            yield f"rules[{i}].apiGroups: wildcard API groups are not least privilege"


def _check_role_binding(binding: dict) -> Iterator[str]:
    ref = binding.get("roleRef") or {}
    if ref.get("kind") != "Role" or ref.get("apiGroup") != "rbac.authorization.k8s.io":
        yield "roleRef: must reference a namespaced Role of rbac.authorization.k8s.io"
    namespace = (binding.get("metadata") or {}).get("namespace")
    for i, subject in enumerate(binding.get("subjects") or []):
        if subject.get("kind") != "ServiceAccount" or subject.get("namespace") != namespace:
            yield f"subjects[{i}]: only ServiceAccounts of the binding's own namespace"
