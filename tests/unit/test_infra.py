"""The cluster and Kubernetes files: every manifest runs this version's image and Ray, the committed
RayService is what its command renders, secrets and entrypoints refer to things that exist, and the
cluster launcher YAMLs pass Ray's own schema."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from lm.cli import main
from lm.infra import image

REPO = Path(__file__).parents[2]
MANIFESTS = sorted((REPO / "infra").glob("*.yaml"))


def ray_pin() -> str:
    return re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def walk(node, key: str):
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_every_manifest_runs_this_version_of_lmforge_and_ray():
    pyproject = (REPO / "pyproject.toml").read_text()
    lmforge = re.search(r'^version = "([^"]+)"$', pyproject, re.M).group(1)
    assert ray_pin() == version("ray")
    assert f">={'.'.join(ray_pin().split('.')[:2])}" in re.search(r'"ray\[[^"]+"', pyproject).group(0)
    assert image() == f"ghcr.io/lmforge/lmforge:{lmforge}-ray{ray_pin()}"
    assert len(MANIFESTS) >= 7
    images, ray_versions = [], []
    for path in MANIFESTS:
        for doc in docs(path):
            images += list(walk(doc, "image"))
            ray_versions += list(walk(doc, "rayVersion"))
    assert images and set(images) == {image()}
    assert ray_versions and set(ray_versions) == {ray_pin()}
    assert f"FROM rayproject/ray:{ray_pin()}-py311-gpu" in (REPO / "infra/Dockerfile").read_text()


def test_the_committed_rayservice_is_what_its_command_renders(tmp_path):
    committed = (REPO / "infra/rayservice.yaml").read_text()
    command = committed.splitlines()[0].split("`")[1].split()
    assert command[:5] == ["lm", "serve", "--render", "infra/rayservice.yaml", "--rayservice"]
    out = tmp_path / "rayservice.yaml"
    assert main(["serve", "--render", str(out), "--rayservice", *command[5:]]) == 0
    assert out.read_text() == committed, "infra/rayservice.yaml is stale: run the command in its first line"
    service = docs(REPO / "infra/rayservice.yaml")[0]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0"  # reachable from the Kubernetes Service
    assert serve_config["applications"][0]["import_path"] == "lm.serve.app:app_builder"


def test_secrets_entrypoints_and_configs_named_by_the_manifests_exist():
    secrets = {d["metadata"]["name"] for d in docs(REPO / "infra/secrets.yaml")}
    for path in MANIFESTS:
        for doc in docs(path):
            for ref in walk(doc, "secretRef"):
                assert ref["name"] in secrets, (path.name, ref)
            for entry in walk(doc, "entrypoint"):
                script, _, cfg = re.search(r"python (jobs/\S+\.py) (--config|-c) (\S+)", entry).groups()
                assert (REPO / script).exists() and (REPO / cfg).exists(), (path.name, entry)
    kinds = {docs(p)[0]["kind"] for p in MANIFESTS if p.name != "secrets.yaml"}
    assert kinds == {"RayCluster", "RayJob", "RayCronJob", "RayService"}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_configs_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster" / name).read_text())
    validate_config(prepare_config(cfg))
    assert any("-c constraints.txt" in c for c in cfg["setup_commands"])  # the pinned torch / ray / deepspeed
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)


def test_the_runtime_env_file_is_a_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "cluster/runtime-env.yaml").read_text())
    RuntimeEnv(**env)  # Ray validates the fields
    assert ".venv" in env["excludes"] and "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
