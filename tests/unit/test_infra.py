"""The cluster and Kubernetes files: every manifest runs this version's image and Ray, the committed
RayService is what its command renders, secrets and entrypoints refer to things that exist, and the
cluster launcher YAMLs pass Ray's own schema."""

import json
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


# ------------------------------------------------------------------------------ the trust boundary

DASHBOARD = 8265  # the dashboard and its Jobs API, which runs any command it is sent


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_the_vm_clusters_keep_the_dashboard_on_the_heads_loopback(name):
    cfg = yaml.safe_load((REPO / "cluster" / name).read_text())
    heads = [c for c in cfg["head_start_ray_commands"] if c.startswith("ray start")]
    assert heads and all(re.findall(r"--dashboard-host[= ](\S+)", c) == ["127.0.0.1"] for c in heads), heads


def _exposes_dashboard(ports: list) -> bool:
    return any(DASHBOARD in (p.get("port"), p.get("targetPort")) or "dashboard" in (p.get("name"), p.get("targetPort"))
               for p in ports or [])


def _outside_services(node):
    """Every Service-like spec in a manifest that reaches beyond the cluster (LoadBalancer, NodePort)."""
    if isinstance(node, dict):
        if node.get("type") in ("LoadBalancer", "NodePort"):
            yield node
        for value in node.values():
            yield from _outside_services(value)
    elif isinstance(node, list):
        for item in node:
            yield from _outside_services(item)


def test_kubernetes_reaches_the_dashboard_only_through_a_clusterip_service():
    heads = []
    for path in MANIFESTS:
        for doc in docs(path):
            for head in walk(doc, "headGroupSpec"):  # KubeRay's head Service carries every head port, 8265 too
                heads.append(path.name)
                assert head.get("serviceType") == "ClusterIP" and head.get("enableIngress") is False, path.name
                assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the Service must reach the pod
            assert not any(_exposes_dashboard(s.get("ports")) for s in _outside_services(doc)), path.name
            assert not any(v is True for v in walk(doc, "enableIngress")), path.name
            if doc.get("kind") == "Ingress":
                backends = [s.get("port", {}) for s in walk(doc, "service")]
                assert not any(b.get("number") == DASHBOARD or b.get("name") == "dashboard" for b in backends)
    assert sorted(heads) == ["raycluster.yaml", "rayservice.yaml"]
    notes = (REPO / "infra/README.md").read_text()
    assert "kubectl port-forward svc/lmforge-head-svc 8265:8265" in notes and "ClusterIP" in notes


def test_the_docs_submit_jobs_through_a_tunnel():
    """Every `--address http://…` example outside Kubernetes goes to 127.0.0.1 (`ray dashboard`, ssh -L)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "cluster/README.md",
             *sorted((REPO / "cluster").glob("*.yaml"))]
    found = {}
    for path in files:
        name = str(path.relative_to(REPO))
        found[name] = re.findall(r"--address[= ](https?://\S+)", path.read_text())
        assert all(a.startswith("http://127.0.0.1:8265") for a in found[name]), (name, found[name])
    assert len(found["docs/cluster.md"]) >= 2 and found["cluster/README.md"] and found["cluster/aws.yaml"]
    assert "ray dashboard cluster/aws.yaml" in (REPO / "docs/cluster.md").read_text()


def test_only_the_jobs_role_may_write_the_runs_bucket():
    """DeepSpeed and Ray Tune unpickle what they resume from: the bucket policy denies every other writer."""
    profile = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())["available_node_types"]["head"]
    role = profile["node_config"]["IamInstanceProfile"]["Arn"].replace(":instance-profile/", ":role/")
    runs = next(b for b in json.loads((REPO / "infra/bucket.json").read_text())["buckets"]
                if b["name"] == "lmforge-runs")
    denies = [s for s in runs["policy"]["Statement"] if s["Effect"] == "Deny" and s["Principal"] == "*"]
    assert any({"s3:PutObject", "s3:DeleteObject"} <= set(s["Action"])
               and s["Resource"] == "arn:aws:s3:::lmforge-runs/*"
               and s["Condition"] == {"ArnNotEquals": {"aws:PrincipalArn": [role]}} for s in denies), denies
    granted = json.loads((REPO / "infra/iam-policy.json").read_text())["Statement"]
    writes = [s["Resource"] for s in granted if "s3:PutObject" in s["Action"]]
    assert writes == [["arn:aws:s3:::lmforge-runs/*"]]  # the role writes the runs bucket only
