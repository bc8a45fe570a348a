"""launchers/: shell syntax, the runtime env, the commands the scripts build, and the overrides they use.

No cluster is contacted: `ray` and `deepspeed` are replaced by stubs on PATH that record their
arguments, so these tests check exactly what the scripts would run.
"""
from __future__ import annotations

import dataclasses
import re
import stat
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from mqscale.train.config import Config, load_train_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ROOT / "launchers"
SCRIPTS = ["ray_submit.sh", "deepspeed.sh", "slurm_ray.sbatch"]
DEBUG = "configs/stackformer/debug.yaml"


def _pyproject_deps() -> dict[str, str]:
    """{canonical name: specifier} of [project.dependencies]."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(Requirement(d).name): str(Requirement(d).specifier) for d in deps}


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", SCRIPTS)
def test_shell_syntax(name):
    r = subprocess.run(["bash", "-n", str(LAUNCHERS / name)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr


def test_runtime_env():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = yaml.safe_load((LAUNCHERS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for pattern in (".venv", "runs", ".git", "*.tar"):
        assert pattern in env["excludes"]
    pip = env["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    assert packages
    deps = _pyproject_deps()
    for entry in packages:
        req = Requirement(entry)
        name = canonicalize_name(req.name)
        assert name in deps, f"{entry!r} is not a dependency in pyproject.toml"
        assert str(req.specifier) == deps[name], f"{entry!r} drifted from pyproject.toml ({deps[name]})"
    names = {canonicalize_name(Requirement(p).name) for p in packages}
    # torch comes with the cluster image, and Ray must never be installed through a runtime env
    assert not names & {"torch", "ray"}
    assert names == set(deps) - {"torch", "ray"}, "a runtime dependency is missing from the runtime env"
    env_vars = env.get("env_vars") or {}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    assert not any("TOKEN" in k or "SECRET" in k for k in env_vars)


def test_runtime_env_accepted_by_ray():
    runtime_env = pytest.importorskip("ray.runtime_env")
    env = yaml.safe_load((LAUNCHERS / "runtime_env.yaml").read_text())
    parsed = runtime_env.RuntimeEnv(**env)
    assert parsed["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_hostfile_example():
    # the same rule as DeepSpeed's launcher/runner.py:_parse_hostfile (importing it costs seconds)
    hosts = []
    for line in (LAUNCHERS / "hostfile.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.search(r"^(\S+)\s+slots=(\d+)", line)
        assert m, f"bad hostfile line: {line!r}"
        hosts.append(m.group(1))
    assert hosts and len(hosts) == len(set(hosts))


def test_config_files_referenced_exist():
    refs = set()
    for f in LAUNCHERS.iterdir():
        refs |= set(re.findall(r"configs/[\w./-]+\.yaml", f.read_text()))
    assert refs
    missing = sorted(r for r in refs if not (ROOT / r).is_file())
    assert not missing, missing


# --------------------------------------------------------------------------- overrides

SECTIONS = "|".join(f.name for f in dataclasses.fields(Config))
OVERRIDE = re.compile(rf"(?<![\w.$/-])((?:{SECTIONS})(?:\.[a-z_]+)+)=(\"[^\"]*\"|'[^']*'|[^\s\"'`,\\)]*)")


def _overrides() -> list[tuple[str, str, str]]:
    found = []
    for f in sorted(LAUNCHERS.iterdir()):
        for key, value in OVERRIDE.findall(f.read_text()):
            found.append((f.name, key, value.strip("\"'")))
    return found


def _key_exists(key: str) -> bool:
    node = Config
    for part in key.split("."):
        if node is dict:
            return True  # a free-form mapping such as checkpoint.storage_options
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = dict if typing.get_origin(hints[part]) is dict else hints[part]
    return True


def test_launcher_overrides_exist_and_parse():
    found = _overrides()
    files = {f for f, _, _ in found}
    assert {"ray_submit.sh", "slurm_ray.sbatch", "README.md"} <= files, files
    keys = {k for _, k, _ in found}
    assert {"ray.num_workers", "ray.use_gpu", "ray.cpus_per_worker", "ray.max_failures",
            "ray.address", "checkpoint.dir", "data.train_url"} <= keys
    for fname, key, value in found:
        assert _key_exists(key), f"{fname}: {key} is not a config key"
        if not value or "$" in value or value == "...":
            continue  # filled in by the shell, or a placeholder
        load_train_config(DEBUG, [f"{key}={value}"])  # raises ConfigError on a bad type or range


# --------------------------------------------------------------------------- what the scripts run


@pytest.fixture
def stubs(tmp_path):
    """`ray` and `deepspeed` stubs that log their cwd, RAY_AUTH_MODE and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("ray", "deepspeed"):
        p = bin_dir / name
        p.write_text(
            "#!/usr/bin/env bash\n"
            f"{{ echo 'cmd={name}'; echo \"cwd=$PWD\"; echo \"auth=${{RAY_AUTH_MODE-<unset>}}\";"
            f" for a in \"$@\"; do echo \"arg=$a\"; done; }} >> '{log}'\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
    return env, log, home


def _run(script, args, env):
    return subprocess.run(["bash", str(LAUNCHERS / script), *args], capture_output=True, text=True,
                          env=env, timeout=20)


def _calls(log: Path) -> list[dict]:
    calls = []
    if not log.exists():
        return calls
    for line in log.read_text().splitlines():
        k, v = line.split("=", 1)
        if k == "cmd":
            calls.append({"cmd": v, "args": []})
        elif k == "arg":
            calls[-1]["args"].append(v)
        else:
            calls[-1][k] = v
    return calls


@pytest.mark.parametrize("script", ["ray_submit.sh", "deepspeed.sh"])
def test_usage_without_arguments(script, stubs):
    env, log, _ = stubs
    r = _run(script, [], env)
    assert r.returncode != 0
    assert "usage:" in r.stderr
    assert _calls(log) == [], "the script ran a launcher without arguments"
    r = _run(script, ["--help"], env)
    assert r.returncode == 0 and "usage:" in r.stdout and _calls(log) == []


def test_ray_submit_command(stubs):
    env, log, _ = stubs
    args = ["--config", DEBUG, "ray.num_workers=2", "checkpoint.dir=s3://b/runs"]
    r = _run("ray_submit.sh", ["--no-wait", "--", *args],
             {**env, "RAY_ADDRESS": "http://head:8265", "RAY_AUTH_TOKEN": "t0k"})
    assert r.returncode == 0, r.stderr
    (call,) = _calls(log)
    assert call["cmd"] == "ray" and call["cwd"] == str(ROOT)
    assert call["args"] == ["job", "submit", "--address", "http://head:8265",
                            "--runtime-env", "launchers/runtime_env.yaml", "--working-dir", ".",
                            "--no-wait", "--", "python", "-m", "mqscale.train", *args]
    assert call["auth"] == "token"  # a token is available, so the client must send it
    assert "t0k" not in r.stdout + r.stderr


def test_ray_submit_auth_mode(stubs):
    env, log, home = stubs
    base = {**env, "RAY_ADDRESS": "http://head:8265"}
    # no token anywhere: RAY_AUTH_MODE is left alone
    assert _run("ray_submit.sh", ["--config", DEBUG], base).returncode == 0
    # a token in the default file: token mode
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("abc")
    assert _run("ray_submit.sh", ["--config", DEBUG], base).returncode == 0
    # explicit opt-out is respected
    assert _run("ray_submit.sh", ["--config", DEBUG], {**base, "RAY_AUTH_MODE": "disabled"}).returncode == 0
    assert [c["auth"] for c in _calls(log)] == ["<unset>", "token", "disabled"]


def test_ray_submit_refuses_early(stubs, tmp_path):
    env, log, _ = stubs
    r = _run("ray_submit.sh", ["--config", DEBUG], env)  # no RAY_ADDRESS
    assert r.returncode != 0 and "RAY_ADDRESS" in r.stderr
    bad = {**env, "RAY_ADDRESS": "http://head:8265", "RAY_AUTH_MODE": "token"}
    r = _run("ray_submit.sh", ["--config", DEBUG], bad)  # token mode, but no token
    assert r.returncode != 0 and "token" in r.stderr
    r = _run("ray_submit.sh", ["--config", DEBUG], {**bad, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")})
    assert r.returncode != 0 and "RAY_AUTH_TOKEN_PATH" in r.stderr
    assert _calls(log) == []


def test_deepspeed_command(stubs, tmp_path):
    env, log, _ = stubs
    args = ["--config", DEBUG, "deepspeed.zero_stage=2"]
    r = _run("deepspeed.sh", args, {**env, "NUM_GPUS": "2"})
    assert r.returncode == 0, r.stderr
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=1\n")
    r = _run("deepspeed.sh", args, {**env, "HOSTFILE": str(hostfile), "DS_ARGS": "--launcher openmpi"})
    assert r.returncode == 0, r.stderr
    local, multi = _calls(log)
    assert local["cwd"] == str(ROOT)
    assert local["args"] == ["--num_gpus", "2", "--module", "mqscale.train", "--launcher", "deepspeed", *args]
    assert multi["args"] == ["--hostfile", str(hostfile), "--launcher", "openmpi",
                             "--module", "mqscale.train", "--launcher", "deepspeed", *args]
    r = _run("deepspeed.sh", args, {**env, "HOSTFILE": str(tmp_path / "missing")})
    assert r.returncode != 0 and "HOSTFILE" in r.stderr
    assert len(_calls(log)) == 2
