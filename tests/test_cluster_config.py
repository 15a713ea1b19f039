"""Offline checks of `cluster.yaml`, the Ray cluster-launcher config for AWS.

`ray up` reads the file and, before anything is launched, runs (ray/autoscaler/_private/
commands.py, `_bootstrap_config`):

1. `prepare_config`: merges aws/defaults.yaml, the common setup commands and per-type worker
   limits. Pure Python: runs here.
2. `fillout_available_node_types_resources`: asks EC2 (DescribeInstanceTypes) for CPUs/GPUs.
   Needs AWS: not run; the file states its resources, and a table below checks them.
3. `validate_config`: ray-schema.json (JSON Schema draft-07) plus cross-field rules (head type
   exists, min_workers fit under max_workers). Runs here.
4. `bootstrap_aws`: IAM profile, key pair, subnets, security group, AMI. Key pair, subnets and
   security group call AWS: not run. The IAM step (skipped when the file names the profiles),
   the AMI check, the launch-template/network-interface steps and the security group's rule
   list are pure and run here where boto3 is installed (the module imports it).

The v2 autoscaler (the default for `ray up` since Ray 2.50) reads the config through
`AutoscalingConfig`; it runs here too. Then tlray's own rules: nothing but SSH open to the
internet, token authentication on, no training on the head, GPU workers on spot with an
on-demand fallback, shared storage settings present. Nothing here touches the network.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

WORLD = {"0.0.0.0/0", "::/0"}

# (GPUs, vCPUs) per instance type, from EC2's instance-type pages: g5 has NVIDIA A10G,
# g6 NVIDIA L4; both families use the same sizes.
GPU_INSTANCES = {
    f"{family}.{size}": counts
    for family in ("g5", "g6")
    for size, counts in {
        "xlarge": (1, 4), "2xlarge": (1, 8), "4xlarge": (1, 16), "8xlarge": (1, 32),
        "16xlarge": (1, 64), "12xlarge": (4, 48), "24xlarge": (4, 96), "48xlarge": (8, 192),
    }.items()
}


# --------------------------------------------------------------------------- helpers


def load_cluster_config(path: Path = CLUSTER_YAML) -> dict:
    """The file as `ray up` loads it (yaml.safe_load: anchors and merge keys resolved)."""
    with open(path) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    """The cluster-launcher JSON schema that ships in the installed Ray wheel."""
    text = (importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text()
    schema = json.loads(text)
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def validate_cluster_config(config: dict) -> dict:
    """Validate a launcher config the way `ray up` does before it calls AWS.

    Returns the prepared config (defaults merged). Raises `jsonschema.ValidationError` for
    what the schema rejects (an unknown key, a wrong type) and `ValueError` for Ray's
    cross-field rules. The argument is not modified.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    # The file as written: prepare_config would otherwise fill in or drop some fields first.
    jsonschema.Draft7Validator(ray_schema()).validate(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # What the head's v2 autoscaler does with it (no file hashing: that reads local files).
    AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True)
    return prepared


def shell_words(command: str) -> list[str]:
    """A command line split the way the shell would (quotes removed, `;`/`&&` kept apart)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def ray_start_args(command: str) -> list[str]:
    """The arguments after `ray start` in a start command."""
    words = shell_words(command)
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["ray", "start"]:
            rest = words[i + 2 :]
            stop = next((j for j, w in enumerate(rest) if w in {";", "&&", "||", "|"}), None)
            return rest[:stop]
    raise AssertionError(f"no `ray start` in {command!r}")


def option_values(args: list[str]) -> dict:
    """`--flag value` and `--flag=value` pairs; a flag with no value maps to True."""
    values: dict = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            key, value = arg.split("=", 1)
            values[key] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[arg] = args[i + 1]
        else:
            values[arg] = True
    return values


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def settings_command(config: dict) -> str:
    return config["metadata"]["tlray_settings"]


def run_bash(command: str, home: Path, env: dict | None = None) -> None:
    """Run one of the file's commands with HOME pointing at a scratch folder."""
    full_env = {"HOME": str(home), "PATH": "/usr/bin:/bin", **(env or {})}
    subprocess.run(["bash", "-c", command], check=True, env=full_env, timeout=10)


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip())
    return {key: value for key, value in pairs}


def world_open_ports(rules: list[dict]) -> list[tuple]:
    """(protocol, from, to) of every inbound rule that admits the whole internet."""
    opened = []
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        if cidrs & WORLD:
            opened.append((rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")))
    return opened


@pytest.fixture(scope="module")
def config() -> dict:
    return load_cluster_config()


@pytest.fixture(scope="module")
def prepared(config) -> dict:
    return validate_cluster_config(config)


def worker_types(config: dict) -> dict:
    return {name: node for name, node in config["available_node_types"].items()
            if name != config["head_node_type"]}


# --------------------------------------------------------------------------- Ray's validation


def test_cluster_yaml_passes_ray_schema_and_config_preparation(config, prepared):
    assert config["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config gave the head type max_workers 0 and merged the common setup commands.
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == \
        config["setup_commands"]


def _with(config: dict, change) -> dict:
    bad = copy.deepcopy(config)
    change(bad)
    return bad


# A broken copy of the file -> (the change, the error, what the error says).
BAD_COPIES = {
    "unknown top-level key": (
        lambda c: c.update(gpus_please=8),
        jsonschema.ValidationError, "'gpus_please' was unexpected"),
    "max_workers of the wrong type": (
        lambda c: c.update(max_workers="lots"),
        jsonschema.ValidationError, "'lots' is not of type 'integer'"),
    "misspelt node-type key": (
        lambda c: c["available_node_types"]["gpu.spot"].update(min_worker=1),
        jsonschema.ValidationError, "'min_worker' was unexpected"),
    "negative GPU count": (
        lambda c: c["available_node_types"]["gpu.spot"]["resources"].update(GPU=-1),
        jsonschema.ValidationError, "less than the minimum of 0"),
    "unknown security-group key": (
        lambda c: c["provider"]["security_group"].update(OpenEverything=True),
        jsonschema.ValidationError, "'OpenEverything' was unexpected"),
    "head type that does not exist": (
        lambda c: c.update(head_node_type="nope"),
        ValueError, "must be one of `available_node_types`"),
    "min_workers above max_workers": (
        lambda c: c["available_node_types"]["gpu.ondemand"].update(min_workers=5),
        ValueError, "smaller than the sum of `min_workers`"),
}


@pytest.mark.parametrize("what", list(BAD_COPIES))
def test_validation_rejects_a_broken_copy(config, what):
    change, error, message = BAD_COPIES[what]
    with pytest.raises(error, match=re.escape(message)):
        validate_cluster_config(_with(config, change))


def test_ray_start_flags_exist_in_this_ray(config):
    """Parse each `ray start` with Ray's own click command: a misspelt flag fails here."""
    from ray.scripts.scripts import start

    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    worker = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and len(worker) == 1
    head_params = start.make_context("start", ray_start_args(head[0])).params
    worker_params = start.make_context("start", ray_start_args(worker[0])).params
    assert head_params["head"] and not worker_params["head"]
    assert head_params["autoscaling_config"], "the head must run the autoscaler"
    assert worker_params["address"] == "$RAY_HEAD_IP:6379"


def test_every_command_is_valid_bash(config):
    for command in all_commands(config) + [settings_command(config)]:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


def test_file_mounts_sources_exist(config):
    mounts = dict(config["file_mounts"])
    assert mounts.pop("/home/ubuntu/.ray/auth_token") == "~/.ray/auth_token"
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repo"


# --------------------------------------------------------------------------- node types


def test_head_offers_no_cpus_or_gpus_for_training(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU machine"
    assert "InstanceMarketOptions" not in head["node_config"], "the head is on-demand"
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    args = ray_start_args(start)
    assert "--num-cpus=0" in args and "--num-gpus=0" in args


def test_worker_types_have_gpus_matching_their_instance_type(config):
    workers = worker_types(config)
    assert workers
    for name, node in workers.items():
        instance = node["node_config"]["InstanceType"]
        assert instance in GPU_INSTANCES, f"{name}: {instance} is not a g5/g6 type"
        gpus, vcpus = GPU_INSTANCES[instance]
        assert node["resources"] == {"CPU": vcpus, "GPU": gpus}, name
        assert node["max_workers"] >= 1 and node["min_workers"] == 0, name


def test_spot_workers_first_with_an_on_demand_fallback(config):
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    workers = worker_types(config)
    spot = {n for n, t in workers.items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    on_demand = {n for n, t in workers.items() if "InstanceMarketOptions" not in t["node_config"]}
    assert spot and on_demand

    # The v2 autoscaler prefers the higher priority among equally good node types.
    types = AutoscalingConfig(copy.deepcopy(config), skip_content_hash=True) \
        .get_node_type_configs()
    assert min(types[n].priority for n in spot) > max(types[n].priority for n in on_demand)
    # The fallback is the same machine, so it can take over any request spot would have taken.
    for s in spot:
        for d in on_demand:
            spot_node = dict(workers[s]["node_config"])
            spot_node.pop("InstanceMarketOptions")
            assert spot_node == workers[d]["node_config"]
            assert types[s].resources == types[d].resources


# --------------------------------------------------------------------------- security


def test_nothing_but_ssh_is_open_to_the_internet(config):
    provider = config["provider"]
    extra_rules = provider.get("security_group", {}).get("IpPermissions", [])
    assert all(port == ("tcp", 22, 22) for port in world_open_ports(extra_rules)), extra_rules
    # Ray's own rules for the group it creates: checked below where boto3 is installed.
    for name, node in config["available_node_types"].items():
        assert "NetworkInterfaces" not in node["node_config"], f"{name}: hand-made interfaces"
    for command in all_commands(config):
        assert "0.0.0.0" not in command, f"binds to every interface: {command!r}"
    (start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in ray_start_args(start)


def test_an_open_dashboard_would_be_caught():
    bad = [{"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265,
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
           {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000,
            "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
           {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
            "IpRanges": [{"CidrIp": "203.0.113.0/24"}]}]
    assert world_open_ports(bad) == [("tcp", 8265, 8265), ("tcp", 5000, 5000)]


def test_token_authentication_stays_on(config):
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in config[key]:
            if "ray start" in command:
                assert "RAY_AUTH_MODE=token ray start" in command, command
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    for command in all_commands(config):
        assert "RAY_AUTH_MODE=disabled" not in command


def test_instances_use_imdsv2_and_encrypted_disks(config):
    for name, node in config["available_node_types"].items():
        node_config = node["node_config"]
        assert node_config["MetadataOptions"]["HttpTokens"] == "required", name
        for disk in node_config["BlockDeviceMappings"]:
            assert disk["Ebs"]["Encrypted"] is True, name
        assert "Name" in node_config["IamInstanceProfile"], f"{name}: S3 access by role"


def test_mlflow_server_is_private_and_stores_artifacts_on_s3(config, tmp_path):
    # Render the systemd unit the head writes, with `sudo tee` captured into a file.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    unit = tmp_path / "unit"
    fake_sudo = bin_dir / "sudo"
    fake_sudo.write_text(f'#!/bin/sh\ncat > "{unit}"\n')
    fake_sudo.chmod(0o755)
    (command,) = [c for c in config["head_setup_commands"] if "tlray-mlflow.service" in c]
    subprocess.run(["bash", "-c", command], check=True, timeout=10,
                   env={"HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"})
    lines = unit.read_text().splitlines()
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    args = shlex.split(exec_start.removeprefix("ExecStart="))
    assert args[0].endswith("/mlflow") and args[1] == "server"
    flags = option_values(args[2:])
    assert flags["--host"] == "${TLRAY_HEAD_IP}", "the private address, never 0.0.0.0"
    assert flags["--backend-store-uri"].startswith("sqlite:////home/ubuntu/")
    assert flags["--artifacts-destination"] == "${TLRAY_MLFLOW_ARTIFACTS}"
    assert flags["--serve-artifacts"] is True
    assert "--app-name" not in flags or flags["--app-name"] == "basic-auth"
    assert "EnvironmentFile=/home/ubuntu/tlray.env" in lines
    # The flags exist in the installed MLflow (its CLI source; importing it takes seconds).
    mlflow_cli = importlib.resources.files("mlflow")
    cli_source = (mlflow_cli / "cli" / "__init__.py").read_text() + \
        (mlflow_cli / "utils" / "cli_args.py").read_text()
    for flag in ("--host", "--port", "--backend-store-uri", "--artifacts-destination",
                 "--serve-artifacts"):
        assert f'"{flag}' in cli_source, flag


# --------------------------------------------------------------------------- settings


def test_storage_settings_reach_every_node(config, tmp_path):
    settings = settings_command(config)
    assert settings in config["setup_commands"], "setup_commands must write the settings"
    run_bash(settings, tmp_path)
    values = read_env_file(tmp_path / "tlray-settings.env")
    for key in ("TLRAY_STORAGE", "TLRAY_DATA", "TLRAY_MLFLOW_ARTIFACTS"):
        assert re.fullmatch(r"s3://[^/\s]+/\S+", values[key]), (key, values[key])
    assert values["AWS_DEFAULT_REGION"] == config["provider"]["region"]
    assert values["TLRAY_HOME"].startswith("/")

    # A worker's ~/tlray.env: the settings plus the tracking URI on the head's private IP.
    (env_command,) = [c for c in config["setup_commands"] if "> ~/tlray.env" in c]
    run_bash(env_command, tmp_path, {"RAY_HEAD_IP": "10.0.1.23"})
    env = read_env_file(tmp_path / "tlray.env")
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.1.23:5000"
    assert env["TLRAY_HEAD_IP"] == "10.0.1.23"
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["TLRAY_STORAGE"] == values["TLRAY_STORAGE"]

    # The head's: its own private IP, as Ray's get_node_ip_address sees it (faked here).
    fake_python = tmp_path / "tlray-venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text("#!/bin/sh\necho 172.31.5.6\n")
    fake_python.chmod(0o755)
    run_bash(env_command, tmp_path)
    env = read_env_file(tmp_path / "tlray.env")
    assert env["MLFLOW_TRACKING_URI"] == "http://172.31.5.6:5000"
    # ... and no file with an empty address when that lookup fails.
    fake_python.write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "tlray.env").unlink()
    with pytest.raises(subprocess.CalledProcessError):
        run_bash(env_command, tmp_path)
    assert not (tmp_path / "tlray.env").exists()

    # Ray processes start with that file exported, so jobs, trials and Train workers see it.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "set -a && . ~/tlray.env && set +a" in start
        assert "source ~/tlray-venv/bin/activate" in start


def test_placeholder_bucket_stops_the_setup(config, tmp_path):
    """The shipped file names no real bucket; setup refuses to go on until one is set."""
    run_bash(settings_command(config), tmp_path)
    (guard,) = [c for c in config["setup_commands"] if "CHANGE-ME" in c and "grep" in c]
    stopped = subprocess.run(["bash", "-c", guard], capture_output=True, text=True,
                             env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert stopped.returncode != 0 and "bucket" in stopped.stderr
    settings = tmp_path / "tlray-settings.env"
    settings.write_text(settings.read_text().replace("CHANGE-ME-tlray-bucket", "my-bucket"))
    run_bash(guard, tmp_path)


# --------------------------------------------------------------------------- bootstrap_aws


def test_offline_steps_of_bootstrap_aws(prepared, monkeypatch):
    pytest.importorskip("boto3", reason="ray's AWS provider module imports boto3")
    from ray.autoscaler._private.aws import config as aws_config

    def no_aws(*args, **kwargs):
        raise AssertionError("this step would call AWS")

    monkeypatch.setattr(aws_config, "_client", no_aws)
    monkeypatch.setattr(aws_config, "_resource", no_aws)

    cfg = copy.deepcopy(prepared)
    aws_config.check_legacy_fields(cfg)
    cfg["head_node"] = {}
    cfg = aws_config._configure_from_launch_template(cfg)
    cfg = aws_config._configure_from_network_interfaces(cfg)
    # The profile is named in the file, so the launcher creates no IAM role or profile.
    cfg = aws_config._configure_iam_role(cfg)
    assert cfg["head_node"] == {}
    aws_config._check_ami(cfg)  # keeps our ImageId: no fallback to Ray's old default AMI
    for node in cfg["available_node_types"].values():
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/")

    # The inbound rules Ray puts on the security group it creates for the cluster.
    extra = cfg["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = aws_config._create_default_inbound_rules(["sg-tlray"], extra)
    assert world_open_ports(rules) == [("tcp", 22, 22)]
    (intracluster,) = [r for r in rules if r.get("UserIdGroupPairs")]
    assert intracluster["UserIdGroupPairs"] == [{"GroupId": "sg-tlray"}]
