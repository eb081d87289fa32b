"""infra/: every file parses, runs real `hip` subcommands with configs that exist and validate,
and the Docker image installs this same package."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from hip_pipeline.main import build_parser
from pipeline.config import load_config
from pipeline.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def check_hip_command(argv: list[str]) -> None:
    """argv = ["hip", sub, ...]: the subcommand parses and its config file validates."""
    assert argv[0] == "hip", argv
    args = build_parser().parse_args(argv[1:])
    config = getattr(args, "config", None)
    if args.command in ("pretrain", "finetune"):
        assert (ROOT / config).is_file(), config
        load_config(TrainConfig, ROOT / config, args.overrides)
    elif args.command == "sweep":
        from sweeps.config import load_sweep

        assert (ROOT / config).is_file(), config
        load_sweep(ROOT / config, args.overrides)
    else:
        assert args.command in ("quickstart", "preprocess", "compare", "sample-data")


def test_runtime_env_uploads_code_but_not_data_runs_or_venv():
    env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for path in (".venv/", "data/", "runs/", ".git/"):
        assert path in env["excludes"], path


def test_cluster_launcher_config_runs_real_commands():
    cfg = yaml.safe_load((INFRA / "cluster-gcp.yaml").read_text())
    assert cfg["provider"]["type"] == "gcp"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["max_workers"] >= t["min_workers"] for t in gpu)
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu)
    assert any(c.startswith("hip ") for c in cfg["setup_commands"])
    # The submit command documented at the top of the file is a real one.
    text = (INFRA / "cluster-gcp.yaml").read_text()
    submit = re.search(r"-- (hip .+)", text).group(1)
    check_hip_command(shlex.split(submit))


def test_kuberay_rayjob_runs_a_real_sweep():
    job = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    check_hip_command(shlex.split(job["spec"]["entrypoint"]))
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for w in workers for c in w["template"]["spec"]["containers"])


def test_dockerfile_installs_this_package():
    text = (INFRA / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    copied = set(re.findall(r"^COPY (\S+) ", text, flags=re.M))
    assert "pyproject.toml" in copied
    for pkg in packages:  # a sub-package (pipeline.data.media) comes with its parent's folder
        top = pkg.split(".")[0]
        assert top in copied, f"Dockerfile does not copy package {pkg}"
    assert re.search(r"^RUN pip install \. ", text, flags=re.M)
    assert "cuda" in text.splitlines()[next(i for i, line in enumerate(text.splitlines())
                                             if line.startswith("FROM"))].lower()
    # The image's console script is the project's.
    assert project["project"]["scripts"]["hip"] == "hip_pipeline.main:main"
    assert "hip --help" in text


@pytest.mark.parametrize("cmd", [
    "hip pretrain --config configs/hip16-imagenet.yaml",
    "hip pretrain --config configs/hip256-audioset.yaml",
    "hip finetune --config configs/quickstart-finetune.yaml --init-from abc123",
    "hip quickstart --small",
])
def test_readme_commands_are_real(cmd):
    assert cmd.split(" --")[0] in (ROOT / "README.md").read_text() or "quickstart" in cmd
    check_hip_command(shlex.split(cmd))


# --- Security (issue 18): nobody without the cluster's token can drive these clusters ---------
# The facts these tests rely on (Ray 2.60, KubeRay >= 1.6) are in docs/ray-notes.md "Security".

TOKEN_LITERAL = re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{16,}")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "python3-dev", "cmake")


def cluster_config() -> dict:
    return yaml.safe_load((INFRA / "cluster-gcp.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), per stage."""
    text = (INFRA / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#")))
    stages: list[list[str]] = []
    for line in joined.splitlines():
        if re.match(r"FROM\s", line, flags=re.I):
            stages.append([])
        if line.strip() and stages:
            stages[-1].append(line.strip())
    return stages


def ray_requirement():
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == "ray")


def image_ray_version() -> str:
    stages = "\n".join("\n".join(stage) for stage in dockerfile_stages())
    pinned = re.search(r"ARG RAY_VERSION=(\S+)", stages)
    assert pinned, "infra/Dockerfile has no ARG RAY_VERSION"
    return pinned.group(1)


def test_cluster_launcher_turns_token_auth_on_for_head_and_workers():
    cfg = cluster_config()
    text = (INFRA / "cluster-gcp.yaml").read_text()
    docker = cfg["docker"]
    # Head and worker containers share docker.run_options (no per-type options override them).
    assert not docker.get("head_run_options") and not docker.get("worker_run_options")
    options = " ".join(docker["run_options"])
    assert re.search(r"(^|\s)(-e|--env)[ =]RAY_AUTH_MODE=token(\s|$)", options), options
    # The token reaches every container from an env file each node writes (0600) from Secret
    # Manager before its container starts: never from this file.
    env_file = re.search(r"--env-file[ =](\S+)", options).group(1)
    init = " ".join(cfg["initialization_commands"])
    written = env_file.replace("$HOME/", "~/")
    assert re.search(rf"> *{re.escape(written)}(\s|$)", init), (env_file, init)
    assert "umask 077" in init and "gcloud secrets versions access" in init
    assert 'test -n "$token"' in init  # a failed lookup stops `ray up`, no empty token
    assert not TOKEN_LITERAL.search(text)
    assert "RAY_AUTH_MODE=disabled" not in text
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE" not in cmd and "RAY_AUTH_TOKEN" not in cmd, cmd


def test_cluster_launcher_dashboard_is_bound_to_the_heads_loopback():
    cfg = cluster_config()
    head = " ".join(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    assert "--head" in head
    hosts = re.findall(r"--dashboard-host[ =](\S+)", head)
    assert hosts == ["127.0.0.1"], head  # reached through `ray dashboard` (an SSH tunnel)
    assert "0.0.0.0" not in (INFRA / "cluster-gcp.yaml").read_text()


def test_cluster_launcher_workers_have_internal_ips_only():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = cluster_config()
    assert cfg["provider"]["use_internal_ips"] is True
    assert cfg["provider"]["use_external_head_ip"] is True  # the head: SSH for `ray up` only
    types = cfg["available_node_types"]
    tags = set()
    for name, node_type in types.items():
        interfaces = node_type["node_config"]["networkInterfaces"]
        assert all(i["subnetwork"] for i in interfaces), name
        if name != cfg["head_node_type"]:
            assert not any(i.get("accessConfigs") for i in interfaces), f"{name}: external IP"
        tags.add(tuple(node_type["node_config"]["tags"]["items"]))
    assert len(tags) == 1, "one network tag on every node: the firewall rules' target"
    tag = tags.pop()[0]
    text = (INFRA / "cluster-gcp.yaml").read_text()
    assert f"--source-tags={tag} --target-tags={tag}" in text  # the intra-cluster rule
    validate_config(prepare_config(cfg))  # still a valid `ray up` config for this Ray


def test_kuberay_rayjob_token_auth_from_a_secret_and_a_cluster_internal_dashboard():
    job = rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]  # KubeRay sets RAY_AUTH_MODE/TOKEN
    assert not TOKEN_LITERAL.search((INFRA / "kuberay-rayjob.yaml").read_text())
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:  # KubeRay keeps a variable the spec already sets
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, group
    # The head service (which the operator and the submitter use) stays inside the cluster;
    # users reach the dashboard with `kubectl port-forward`. Inside the pod the dashboard must
    # listen on the pod's address for them, so 0.0.0.0 there is KubeRay's default, not exposure.
    assert head["serviceType"] == "ClusterIP"
    assert "headService" not in head and not head.get("enableIngress")
    assert "port-forward svc/" in (INFRA / "kuberay-rayjob.yaml").read_text()


def test_image_runs_as_non_root_without_build_tools():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    final = stages[-1]
    base = [s[0].split()[1] for s in stages]
    assert len(set(base)) == 1, f"the venv moves between stages on the same base: {base}"
    assert any(re.match(r"COPY --from=\S+ /opt/venv /opt/venv", i) for i in final)
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0].isdigit(), "numeric, so Kubernetes can check runAsNonRoot"
    assert any(re.search(r"\bHOME=/home/\w+", i) for i in final if i.startswith("ENV "))
    installs = " ".join(i for i in final if "apt-get install" in i or "pip install" in i)
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", installs), tool
    assert not any(i.startswith("EXPOSE") for i in final), "docker run -P would publish 8265"


def test_ray_is_pinned_to_the_tested_version_everywhere():
    from importlib.metadata import version

    tested = version("ray")  # what this suite runs on
    major, minor = map(int, tested.split(".")[:2])
    spec = ray_requirement().specifier
    assert tested in spec and f"{major}.{minor}.9" in spec, spec  # its patch releases: yes
    for other in (f"{major}.{minor + 1}.0", f"{major}.{minor - 1}.0", f"{major + 1}.0.0"):
        assert other not in spec, f"pyproject's {spec} admits Ray {other}"
    image = image_ray_version()
    assert image in spec and image.startswith(f"{major}.{minor}."), (image, spec)
    builder = "\n".join("\n".join(stage) for stage in dockerfile_stages())
    assert re.search(r'pip install \. "ray\[[^\]]*\]==\$\{RAY_VERSION\}"', builder)
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == image
