"""cluster/ against the real schemas: Ray's cluster-launcher schema and KubeRay's CRDs.

No cloud and no Kubernetes here, so the checks are what `ray up` and the Kubernetes API
server would refuse first: the launcher config through Ray's own ``prepare_config`` and
``validate_config`` (ray-schema.json), every KubeRay manifest through its CRD's
openAPIV3Schema with unknown fields rejected (kubectl's strict field validation). Every
job command in a manifest must parse with that job's flags, and every version must agree
with pyproject.toml, the one source of them.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml"]
# KubeRay's published CRDs (provenance in their README.md): the schema the API server applies.
# A copy lives in the repository, so that the tests need nothing from outside the checkout.
CRD_DIR = REPO / "tests" / "schemas" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
SERVE_CONFIG = CLUSTER / "serve.yaml"
# Core Kubernetes kinds the manifests may also hold: no schema of them is available offline.
CORE_KINDS = {("v1", "PersistentVolumeClaim"), ("v1", "ServiceAccount"), ("batch/v1", "CronJob")}
DNS_1123_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirement(name: str, requirements: list[str] | None = None) -> SpecifierSet:
    """The version range pyproject.toml gives ``name`` (extras and markers ignored), in the core
    dependencies or, for the training-only ones, in the ``train`` extra."""
    for req in requirements or PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["train"]:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?\s*([<>=!~,.\d\s]+)", req)
        if match:
            return SpecifierSet(match.group(2))
    raise KeyError(f"{name} is not in pyproject.toml's dependencies")


def manifests() -> list[tuple[str, dict]]:
    """Every document of every YAML file under cluster/kuberay, named file#index."""
    documents = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                documents.append((f"{path.name}#{i}", doc))
    return documents


MANIFESTS = manifests()


def manifests_of(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in MANIFESTS if doc["kind"] == kind]


# --- the cluster launcher --------------------------------------------------------------------


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_is_valid_for_ray_up(path: Path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, launcher_schema())  # the file as written
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` sees it, defaults merged


@functools.cache
def launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("break_it", [
    lambda c: c.update(max_worker=4),  # a misspelt key
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="none"),  # a wrong type
    lambda c: c.update(head_node_type="cpu_head"),  # names no node type
], ids=["misspelt key", "wrong type", "unknown head node type"])
def test_a_broken_launcher_config_is_rejected(break_it):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))


def test_launcher_setup_installs_this_project_with_the_dockerfile_python():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert config["file_mounts"]["~/mnist_ray"] == "."
    setup = "\n".join(config["setup_commands"])
    assert '"$HOME/mnist_ray[train,gpu,serve]"' in setup  # pyproject.toml's versions, not a list of its own
    (python,) = re.findall(r"--python (\d+\.\d+) ", setup)
    assert python == dockerfile_python()


# --- KubeRay manifests -------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict:
    """The CRD's openAPIV3Schema for a served version, made strict like the API server."""
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    group = crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            assert version["served"], f"{api_version} {kind} is no longer served"
            return strict(version["schema"]["openAPIV3Schema"])
    raise KeyError(f"the {kind} CRD has no version {api_version}")


def strict(schema: dict) -> dict:
    """Reject unknown fields where Kubernetes would (strict field validation, kubectl's default).

    JSON Schema allows unknown properties; Kubernetes drops or refuses them, unless a
    schema says ``x-kubernetes-preserve-unknown-fields``. A misspelt field must fail here.
    """
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [strict(s) for s in schema[key]]
    return schema


def unevaluated_rules(instance, schema: dict, path: str = "") -> list[str]:
    """CEL rules (x-kubernetes-validations) on the fields a manifest sets: jsonschema cannot run them."""
    rules = [f"{path or '/'}: {r['rule']}" for r in schema.get("x-kubernetes-validations", [])]
    if isinstance(instance, dict):
        for key, value in instance.items():
            if key in schema.get("properties", {}):
                rules += unevaluated_rules(value, schema["properties"][key], f"{path}/{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                rules += unevaluated_rules(value, schema["additionalProperties"], f"{path}/{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            rules += unevaluated_rules(item, schema["items"], f"{path}/{i}")
    return rules


def crd_errors(manifest: dict) -> list[str]:
    schema = crd_schema(manifest["kind"], manifest["apiVersion"])
    validator = jsonschema.Draft4Validator(schema)
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


@pytest.mark.parametrize("name, manifest", MANIFESTS, ids=[name for name, _ in MANIFESTS])
def test_manifest_is_valid(name: str, manifest: dict):
    assert DNS_1123_NAME.match(manifest["metadata"]["name"]), manifest["metadata"]["name"]
    if manifest["kind"] not in CRD_FILES:
        assert (manifest["apiVersion"], manifest["kind"]) in CORE_KINDS
        return
    assert crd_errors(manifest) == []
    # Rules in CEL are not evaluated here: the manifests keep clear of the fields that carry them.
    schema = crd_schema(manifest["kind"], manifest["apiVersion"])
    assert unevaluated_rules(manifest, schema) == []


def test_every_crd_kind_has_a_manifest():
    assert {doc["kind"] for _, doc in MANIFESTS} >= set(CRD_FILES)


BREAKAGES = {
    "misspelt field": ("RayCluster", lambda m: m["spec"]["workerGroupSpecs"][0].update(maxReplica=8)),
    "wrong type": ("RayCluster", lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas="two")),
    "missing required field": ("RayCluster", lambda m: m["spec"]["workerGroupSpecs"][0].pop("groupName")),
    "value not in enum": ("RayCluster", lambda m: m["spec"]["authOptions"].update(mode="password")),
    "field of another kind": ("RayJob", lambda m: m["spec"].update(schedule="30 2 * * *")),
    "misspelt nested field": ("RayCronJob", lambda m: m["spec"]["jobTemplate"].update(entryPoint="python")),
    "serve config not a string": ("RayService", lambda m: m["spec"].update(serveConfigV2={"apps": 1})),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_manifest_is_rejected(breakage: str):
    kind, break_it = BREAKAGES[breakage]
    manifest = copy.deepcopy(manifests_of(kind)[0][1])
    assert crd_errors(manifest) == []
    break_it(manifest)
    assert crd_errors(manifest) != []


def test_cel_rules_on_a_manifest_are_found():
    """The check that no CEL rule goes unevaluated can fail: deletionStrategy carries rules."""
    manifest = copy.deepcopy(manifests_of("RayJob")[0][1])
    manifest["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"},
                                            "onFailure": {"policy": "DeleteNone"}}
    assert unevaluated_rules(manifest, crd_schema("RayJob", manifest["apiVersion"])) != []


def test_jobs_run_on_the_cluster_with_its_token():
    """The RayJobs select the RayCluster, and their submitters use the Secret the cluster's auth uses."""
    (_, cluster), = manifests_of("RayCluster")
    secret = cluster["spec"]["authOptions"]["secretName"]
    pods = [spec.get("submitterPodTemplate") for spec in job_specs()] + [
        cron["spec"]["jobTemplate"]["spec"]["template"] for _, cron in manifests_of("CronJob")]
    for spec in job_specs():
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


# --- the Serve application: cluster/serve.yaml and the RayService that carries it ---------------


def serve_config_problems(config: dict) -> list[str]:
    """What Ray's Serve config schema refuses, and the keys it would silently ignore: its pydantic
    models accept unknown keys, so a misspelt one (``num_replica``) would otherwise pass."""
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        return [str(exc)]
    problems = [f"unknown key {k!r}" for k in set(config) - set(ServeDeploySchema.model_fields)]
    for app in config.get("applications", []):
        problems += [f"application: unknown key {k!r}"
                     for k in set(app) - set(ServeApplicationSchema.model_fields)]
        for deployment in app.get("deployments", []):
            problems += [f"deployment: unknown key {k!r}"
                         for k in set(deployment) - set(DeploymentSchema.model_fields)]
    return problems


def test_serve_config_is_valid_for_serve_deploy():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    assert serve_config_problems(config) == []
    broken = copy.deepcopy(config)
    broken["applications"][0]["deployments"][0]["num_replica"] = 2
    assert serve_config_problems(broken) == ["deployment: unknown key 'num_replica'"]


def test_the_rayservice_deploys_cluster_serve_yaml_with_the_clusters_token():
    (_, service), = manifests_of("RayService")
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    (_, cluster), = manifests_of("RayCluster")
    assert service["spec"]["rayClusterConfig"]["authOptions"] == cluster["spec"]["authOptions"]
    # Serve reads its ingress switch in every Ray process: head and workers must agree.
    ray_cluster = service["spec"]["rayClusterConfig"]
    pods = [ray_cluster["headGroupSpec"]["template"]]
    pods += [group["template"] for group in ray_cluster["workerGroupSpecs"]]
    envs = [{e["name"]: e["value"] for e in pod["spec"]["containers"][0].get("env", [])} for pod in pods]
    assert all(env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" for env in envs), envs


def test_serve_config_builds_this_projects_application(tiny_onnx_run):
    """import_path and args are what mnist_ray.serve.app builds (with a real run in place of the volume's)."""
    import importlib

    from mnist_ray.serve.app import DEPLOYMENT_NAME

    (app,) = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    application = builder({**app["args"], "model": str(tiny_onnx_run)})
    assert application._bound_deployment.name == DEPLOYMENT_NAME
    assert [d["name"] for d in app["deployments"]] == [DEPLOYMENT_NAME]


# --- entrypoints -------------------------------------------------------------------------------


def job_specs() -> list[dict]:
    """The RayJob specs: of the RayJobs, and the templates of the RayCronJobs."""
    return [m["spec"] for _, m in manifests_of("RayJob")] + [
        m["spec"]["jobTemplate"] for _, m in manifests_of("RayCronJob")]


def entrypoints() -> list[tuple[str, list[str]]]:
    """Every job command in cluster/: (where, argv) with argv starting ``python jobs/X.py``."""
    found = [(name, shlex.split(m["spec"]["entrypoint"])) for name, m in manifests_of("RayJob")]
    found += [(name, shlex.split(m["spec"]["jobTemplate"]["entrypoint"]))
              for name, m in manifests_of("RayCronJob")]
    for name, cron in manifests_of("CronJob"):
        command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
        found.append((name, command[command.index("--") + 1:]))
    return found


ENTRYPOINTS = entrypoints()


@functools.cache
def job_help(script: str) -> str:
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def entrypoint_params():
    for where, argv in ENTRYPOINTS:
        script = argv[1] if len(argv) > 1 else ""
        yield pytest.param(argv, id=f"{where}:{script}")


@pytest.mark.parametrize("argv", entrypoint_params())
def test_entrypoint_runs_an_existing_job_with_flags_it_accepts(argv: list[str]):
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), argv
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
    listed = set(re.findall(r"--[a-z][-a-z]*", job_help(argv[1])))
    flags = {arg.split("=")[0] for arg in argv[2:] if arg.startswith("--")}
    assert flags <= listed, f"{argv[1]} --help does not list {sorted(flags - listed)}"
    # The values too: argparse checks each flag's value as it reads it, and stops at --help.
    parsed = subprocess.run([sys.executable, *argv[1:], "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert parsed.returncode == 0, parsed.stderr[-2000:]


def test_both_nightly_schedules_run_the_same_job():
    """raycronjob-score.yaml and cronjob-score.yaml are alternatives: same command, same time."""
    (_, ray_cron), = manifests_of("RayCronJob")
    (_, kube_cron), = manifests_of("CronJob")
    commands = {where: argv for where, argv in ENTRYPOINTS if "score" in where}
    assert len(set(map(tuple, commands.values()))) == 1, commands
    for key in ("schedule", "timeZone"):
        assert ray_cron["spec"][key] == kube_cron["spec"][key]


# --- versions: pyproject.toml is the one source -----------------------------------------------


def dockerfile_python() -> str:
    (version,) = re.findall(r"^ARG PYTHON_VERSION=(\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    return version


def test_dockerfile_python_satisfies_requires_python():
    assert Version(dockerfile_python()) in SpecifierSet(PYPROJECT["requires-python"])


def test_dockerfile_installs_the_project_not_versions_of_its_own():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert 'ARG INSTALL=".[train,gpu,serve]"' in dockerfile
    assert 'pip install --no-cache-dir "${INSTALL}"' in dockerfile
    assert "COPY pyproject.toml" in dockerfile


def test_gpu_extra_keeps_the_tensorflow_range():
    gpu = requirement("tensorflow", PYPROJECT["optional-dependencies"]["gpu"])
    assert gpu == requirement("tensorflow")


PINNED = re.compile(r"\b(ray|tensorflow|tf-keras)(?:\[[^\]]*\])?\s*==\s*([\d.]+)|rayproject/ray:([\d.]+)")


def test_every_version_in_cluster_agrees_with_pyproject():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    for path in files:
        for match in PINNED.finditer(path.read_text()):
            package, version = match.group(1) or "ray", match.group(2) or match.group(3)
            assert Version(version) in requirement(package), f"{path.name}: {match.group(0)}"
    ray_versions = {m["spec"]["rayVersion"] for _, m in manifests_of("RayCluster")}
    ray_versions |= {m["spec"]["rayClusterConfig"]["rayVersion"] for _, m in manifests_of("RayService")}
    assert ray_versions and all(Version(v) in requirement("ray") for v in ray_versions), ray_versions


def test_every_image_is_this_projects_image_at_its_version():
    images = set(re.findall(r"image: (\S+)", "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))))
    assert len(images) == 1, images  # head, workers and submitters run the same code
    (image,) = images
    assert image.endswith(f"/mnist-ray:{PYPROJECT['version']}"), image
