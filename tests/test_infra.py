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
