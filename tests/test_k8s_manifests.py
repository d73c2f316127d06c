"""deploy/k8s/ against the Kubernetes schemas (kubernetes-validate bundles them: no cluster, no network) and
against sgjax itself: probes on the server's real paths and port, SGJAX_* variables that name real flags.

JobSet is a custom resource, absent from the core schemas: its job template is validated as a core batch/v1
Job (whose pod template is a core PodTemplateSpec), its own few fields by hand."""

import pathlib

import kubernetes_validate
import pytest
import yaml

from sgjax.config import ServerArgs, build_parser

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s"
VERSION = "1.33"  # a recent minor most clusters run; the manifests use nothing newer


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in documents(name)}


def validate(resource: dict) -> None:
    kubernetes_validate.validate(resource, VERSION, strict=True)


def server_flags() -> set[str]:
    return {a.dest for a in build_parser()._actions}


@pytest.mark.parametrize("name", ["gpu-server.yaml", "tpu-multihost-jobset.yaml"])
def test_core_resources_match_the_schemas(name):
    core = [d for d in documents(name) if "x-k8s.io" not in d["apiVersion"]]
    assert core
    for resource in core:
        validate(resource)


def test_the_validator_catches_a_wrong_manifest():
    deployment = by_kind("gpu-server.yaml")["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0] = {"containerPort": 1, "hostPorts": 1}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: an unknown field is an error
        validate(deployment)


def test_the_gpu_server_probes_serves_and_keeps_its_data():
    resources = by_kind("gpu-server.yaml")
    pod = resources["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = ServerArgs().port
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health_generate"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # /health answers 503 while the engine starts: liveness waits for a startup probe that allows for it
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                              "prometheus.io/path": "/metrics"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SGJAX_ENABLE_METRICS"] == "true"  # /metrics exists only with --enable-metrics
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == resources["PersistentVolumeClaim"]["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/cache"]["subPath"] == "cache"
    assert env["SGJAX_COMPILATION_CACHE_DIR"].startswith("/cache/")
    assert env["SGJAX_MODEL_PATH"].startswith("/models/")
    service = resources["Service"]["spec"]
    assert service["selector"] == pod["metadata"]["labels"] and service["ports"][0]["port"] == port


def test_the_tpu_jobset_serves_from_one_pod_per_host_joined_by_jax_distributed():
    resources = by_kind("tpu-multihost-jobset.yaml")
    jobset = resources["JobSet"]
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["spec"]["network"]["enableDNSHostnames"]
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]
    validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "sgjax-hosts"}, "spec": job["spec"]})
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    hosts = int(env["SGJAX_NUM_HOSTS"]["value"])
    assert spec["parallelism"] == spec["completions"] == hosts and spec["completionMode"] == "Indexed"
    assert env["SGJAX_HOST_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # host 0's pod by the name JobSet gives it: <jobset>-<replicated job>-<job index>-<pod index>.<jobset>
    coordinator = f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{jobset['metadata']['name']}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["SGJAX_COORDINATOR"]["value"] == f"{coordinator}:{ports['coordinator']}"
    data, tensor = (int(x) for x in env["SGJAX_MESH"]["value"].split("x"))
    assert data * tensor == hosts * container["resources"]["limits"]["google.com/tpu"]  # the mesh spans the slice
    # every variable is a flag of the command the pods run
    assert container["command"] == ["python", "-m", "sgjax.server"]
    assert {n.removeprefix("SGJAX_").lower() for n in env} <= server_flags()
    # HTTP reaches host 0's pod (the Job controller labels each pod with its completion index), on the port
    # its server listens on, on every interface
    assert ports["http"] == ServerArgs().port and env["SGJAX_HOST"]["value"] == "0.0.0.0"
    service = resources["Service"]
    validate(service)
    assert service["spec"]["selector"] == {"jobset.sigs.k8s.io/jobset-name": jobset["metadata"]["name"],
                                           "batch.kubernetes.io/job-completion-index": "0"}
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["metadata"]["name"] != jobset["metadata"]["name"]  # JobSet's headless Service has that name
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1  # one host failing stops all: restart them together


def test_every_variable_in_the_server_manifest_is_a_server_flag():
    (container,) = by_kind("gpu-server.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"]
    names = {e["name"].removeprefix("SGJAX_").lower() for e in container["env"]}
    assert names <= server_flags(), names - server_flags()
