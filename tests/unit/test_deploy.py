"""deploy/ checked against the project, since no Docker engine or cluster runs here.

The Dockerfiles, the compose stack and the Kubernetes manifests must parse and refer only
to what exists: files in the repository, `kdguard` subcommands, settings (a renamed
setting fails here until deploy/ follows), environment variables the code reads, HTTP
routes the app serves, ports it listens on, and names that the manifests define.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from service.app import create_app
from service.cli import _parser
from service.settings import Settings, load_settings
from tests.support.prometheus import require_binary
from tests.support.promql import REPO_ROOT, RULES_FILE

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIGS = [DEPLOY / "config" / "kdguard.yaml", K8S / "base" / "kdguard.yaml"]
SECRET_ENV = {  # what the Secret / compose provide, in a shape that passes production checks
    "KDGUARD_DATABASE__URL": "postgresql+psycopg://kdguard:s3cr3t-v4lue@postgres:5432/kdguard",
    "KDGUARD_JOBS__BROKER_URL": "redis://redis:6379/0",
    "KDGUARD_AUTH__API_KEYS": '[{"name": "ops", "key": "k9Qz7LmX2vB8nR4t", "scopes": ["admin"]}]',
}


# -- what the project offers --------------------------------------------------------------


def _subcommands() -> set[str]:
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("kdguard has no subcommands")


def _setting_env_names(model: type[BaseModel] = Settings, prefix: str = "KDGUARD_") -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        names.add(env)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= _setting_env_names(field.annotation, f"{env}__")
    return names


def _code_env_names() -> set[str]:
    """KDGUARD_* variables the code reads directly (outside the settings tree)."""
    pattern = re.compile(r"""environ(?:\.get\(|\[)\s*["'](KDGUARD_[A-Z0-9_]+)["']""")
    return {
        name
        for path in (REPO_ROOT / "service").rglob("*.py")
        for name in pattern.findall(path.read_text())
    }


def _routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def _deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield path


def _check_keys(data: Any, model: type[BaseModel], where: str) -> None:
    """Every key of a YAML config names a field (nested groups ignore unknown keys)."""
    assert isinstance(data, dict), where
    for key, value in data.items():
        assert key in model.model_fields, f"{where}: no setting {key!r}"
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, f"{where}.{key}")


# -- settings and environment -------------------------------------------------------------


def test_every_kdguard_variable_in_deploy_is_one_the_service_reads() -> None:
    known = _setting_env_names() | _code_env_names()
    for path in _deploy_files():
        for name in re.findall(r"\bKDGUARD_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            assert name in known, f"{path.relative_to(REPO_ROOT)}: {name} is read by nothing"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_config_files_name_real_settings_and_load_in_production(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("KDGUARD_")]:
        monkeypatch.delenv(name)
    _check_keys(yaml.safe_load(config.read_text()), Settings, config.name)
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(config)
    assert settings.environment == "production"
    assert settings.server.host == "0.0.0.0"
    assert settings.database.auto_migrate is False  # a migration step runs it once
    assert settings.server.workers > 1 and settings.server.metrics_dir is not None
    assert settings.database.url.get_secret_value().startswith("postgresql+psycopg://")


def test_the_example_secret_is_refused_until_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    literals = _overlay_secret()
    monkeypatch.setenv("KDGUARD_AUTH__API_KEYS", literals["api-keys"])
    with pytest.raises(ValueError, match="placeholder"):
        load_settings(K8S / "base" / "kdguard.yaml")


# -- Dockerfiles -------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.jobs"])
def test_dockerfiles_copy_what_exists_and_run_as_a_user(name: str) -> None:
    path = DEPLOY / name
    steps = _instructions(path)
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().split()
    for keyword, rest in steps:
        if keyword == "COPY" and "--from=" not in rest:
            *sources, _ = rest.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{name}: COPY {source} does not exist"
                assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignore], (
                    f"{name}.dockerignore leaves {source} out of the build context"
                )
    user = [rest for keyword, rest in steps if keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    entrypoint = [rest for keyword, rest in steps if keyword == "ENTRYPOINT"][-1]
    assert entrypoint == '["kdguard"]'
    command = yaml.safe_load([rest for keyword, rest in steps if keyword == "CMD"][-1])
    assert command[0] in _subcommands()
    env = " ".join(rest for keyword, rest in steps if keyword == "ENV")
    assert "KDGUARD_MIGRATIONS=" in env, "an installed package finds migrations/ only through it"


def test_the_serving_image_has_no_torch_and_a_healthcheck() -> None:
    steps = _instructions(DEPLOY / "Dockerfile")
    runs = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "pip install ." in runs and "[train]" not in runs and "torch==" not in runs
    (healthcheck,) = [rest for keyword, rest in steps if keyword == "HEALTHCHECK"]
    route = re.search(r"(/v2/health/\w+)", healthcheck)
    assert route is not None and route.group(1) in _routes()
    exposed = [int(rest) for keyword, rest in steps if keyword == "EXPOSE"]
    assert exposed == [Settings().server.port]
    jobs = " ".join(rest for keyword, rest in _instructions(DEPLOY / "Dockerfile.jobs"))
    assert ".[train]" in jobs and "torch==${TORCH_VERSION}" in jobs


# -- docker compose ------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_has_the_whole_stack() -> None:
    services = _compose()["services"]
    assert {"kdguard", "postgres", "redis", "worker", "prometheus", "grafana", "migrate"} <= set(
        services
    )


def test_compose_builds_runs_and_mounts_what_exists() -> None:
    compose = _compose()
    images = {
        "kdguard:latest": "deploy/Dockerfile",
        "kdguard-jobs:latest": "deploy/Dockerfile.jobs",
    }
    for name, service in compose["services"].items():
        if "build" in service:
            assert images[service["image"]] == service["build"]["dockerfile"], name
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
            assert service["command"][0] in _subcommands(), f"{name}: {service['command']}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    serving = compose["services"]["kdguard"]
    environment = serving["environment"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in serving["volumes"]}
    config = DEPLOY / mounted[environment["KDGUARD_CONFIG"]]
    settings = yaml.safe_load(config.read_text())
    assert serving["ports"] == [f"{settings['server']['port']}:{settings['server']['port']}"]
    assert _seconds(serving["stop_grace_period"]) > settings["server"]["shutdown_grace_s"]
    assert "/tmp" in serving["tmpfs"] and settings["server"]["metrics_dir"].startswith("/tmp/")
    for key in SECRET_ENV:
        assert key in environment, f"compose does not set {key}"


def test_compose_prometheus_scrapes_kdguard_and_loads_the_rules() -> None:
    compose = _compose()
    prometheus = compose["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config = yaml.safe_load((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "kdguard"  # what up{job="kdguard"} in the rules expects
    port = yaml.safe_load(CONFIGS[0].read_text())["server"]["port"]
    assert job["static_configs"][0]["targets"] == [f"kdguard:{port}"]
    assert job["metrics_path"] in _routes()
    (rule_glob,) = config["rule_files"]
    rules_dir = DEPLOY / mounts[str(Path(rule_glob).parent)]
    assert rules_dir.resolve() == RULES_FILE.parent.resolve()
    assert [p.name for p in rules_dir.glob(Path(rule_glob).name)] == [RULES_FILE.name]


def test_compose_grafana_gets_its_datasource_and_dashboards() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "kdguard.yml").read_text())
    url = datasources["datasources"][0]["url"]
    variable = re.fullmatch(r"\$\{(\w+)\}", url)
    assert variable is not None, url
    assert grafana["environment"][variable.group(1)] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, _, file = home.rpartition("/")
    assert (DEPLOY / mounts[folder] / file).is_file()


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = require_binary("promtool")
    result = subprocess.run(
        [
            promtool,
            "check",
            "config",
            "--syntax-only",
            str(DEPLOY / "prometheus" / "prometheus.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match is not None, duration
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


# -- Kubernetes ----------------------------------------------------------------------------


def _docs(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "kdguard.yaml"):
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _base() -> dict[tuple[str, str], dict[str, Any]]:
    docs = _docs(K8S / "base") + _docs(K8S / "components" / "servicemonitor")
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def _overlay() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        (K8S / "overlays" / "example" / "kustomization.yaml").read_text()
    )
    return data


def _overlay_secret() -> dict[str, str]:
    (generator,) = _overlay()["secretGenerator"]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def _pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for (kind, name), doc in _base().items():
        if kind in ("Deployment", "Job"):
            template = doc["spec"]["template"]
            yield name, template["metadata"], template["spec"]


def test_the_kustomization_lists_every_manifest_and_the_config() -> None:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (K8S / "base").glob("*.yaml")} - {
        "kustomization.yaml",
        "kdguard.yaml",
    }
    assert listed == on_disk
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["kdguard.yaml"]
    kinds = {kind for kind, _ in _base()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job",
            "PersistentVolumeClaim", "ServiceMonitor"} <= kinds  # fmt: skip


def test_pods_use_real_commands_settings_secrets_and_volumes() -> None:
    config_names = {g["name"] for g in yaml.safe_load(
        (K8S / "base" / "kustomization.yaml").read_text())["configMapGenerator"]}  # fmt: skip
    claims = {name for kind, name in _base() if kind == "PersistentVolumeClaim"}
    secret_keys = set(_overlay_secret())
    overlay_images = {image["name"] for image in _overlay()["images"]}
    for name, _, spec in _pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_names, name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec["containers"]:
            assert container["image"] in overlay_images, f"{name}: {container['image']}"
            assert container["args"][0] in _subcommands(), f"{name}: {container['args']}"
            assert container["resources"]["requests"] and container["resources"]["limits"]
            env = {e["name"]: e for e in container["env"]}
            config_path = Path(env["KDGUARD_CONFIG"]["value"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "configMap" in volumes[mounts[str(config_path.parent)]], name
            for item in env.values():
                if "valueFrom" in item:
                    ref = item["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "kdguard-secrets" and ref["key"] in secret_keys


def test_the_serving_deployment_probes_drains_and_is_scraped() -> None:
    base = _base()
    deployment = base[("Deployment", "kdguard")]
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    (container,) = template["spec"]["containers"]
    settings = yaml.safe_load((K8S / "base" / "kdguard.yaml").read_text())
    routes = _routes()
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"/v2/health/live", "/v2/health/ready"} <= routes
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": settings["server"]["port"]}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = template["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + settings["server"]["shutdown_grace_s"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] in routes
    tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp_mounts and settings["server"]["metrics_dir"].startswith("/tmp/")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = base[("Service", "kdguard")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = base[("PodDisruptionBudget", "kdguard")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = base[("HorizontalPodAutoscaler", "kdguard")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "kdguard"}  # fmt: skip
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    monitor = base[("ServiceMonitor", "kdguard")]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] in routes


def test_kubectl_kustomize_builds_the_example_overlay() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (the manifests are checked above without it)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / "example")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    by_kind = {(doc["kind"], doc["metadata"]["name"].split("-")[0]) for doc in docs}
    assert ("Secret", "kdguard") in by_kind and ("ConfigMap", "kdguard") in by_kind
    for doc in docs:
        assert doc["metadata"].get("namespace", "kdguard") == "kdguard"
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"].startswith("registry.example.com/"), container["image"]
