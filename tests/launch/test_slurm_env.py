"""SLURM variables -> torchrun arguments, with fake environments (no SLURM needed)."""
import pytest

from launch import slurm_env
from launch.slurm_env import SlurmEnvError, expand_nodelist, gpus_per_node, slurm_rendezvous, torchrun_args


@pytest.mark.parametrize("text, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2],b3,c[05]", ["a1", "a2", "b3", "c05"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("node-a.cluster,node-b.cluster", ["node-a.cluster", "node-b.cluster"]),
    ("x[3,1]", ["x3", "x1"]),  # order as written, like scontrol
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("bad", ["", "gpu[01-03", "gpu01-03]", "gpu[a-b]", "gpu[5-3]", "gpu[]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(SlurmEnvError):
        expand_nodelist(bad)


def _env(**kw):
    base = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu[01-03,07]", "SLURM_GPUS_ON_NODE": "8"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_mapping_from_fake_environment():
    r = slurm_rendezvous(_env(), use_scontrol=False)
    assert (r.nnodes, r.node_rank, r.nproc_per_node) == (4, 2, 8)
    assert r.master_addr == "gpu01" and r.port == 29400 + 123456 % 1000 == 29856
    assert r.rdzv_id == "123456" and not r.is_host
    assert r.hosts == ("gpu01", "gpu02", "gpu03", "gpu07")
    assert torchrun_args(r) == [
        "--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu01:29856", "--rdzv-id=123456", "--rdzv-conf=is_host=0"]


def test_first_node_hosts_the_store():
    r = slurm_rendezvous(_env(SLURM_NODEID="0"), use_scontrol=False)
    assert r.is_host and "--rdzv-conf=is_host=1" in torchrun_args(r)


def test_fallback_variable_names_and_overrides():
    env = _env(SLURM_JOB_NUM_NODES=None, SLURM_NNODES="4", SLURM_JOB_NODELIST=None,
               SLURM_NODELIST="n[1-4]", SLURM_JOB_ID=None, SLURM_JOBID="77",
               SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="h100:4", MASTER_PORT="31000")
    r = slurm_rendezvous(env, use_scontrol=False)
    assert (r.nnodes, r.nproc_per_node, r.master_addr, r.port, r.rdzv_id) == (4, 4, "n1", 31000, "77")
    r2 = slurm_rendezvous(env, nproc_per_node=2, port=40000, use_scontrol=False)
    assert (r2.nproc_per_node, r2.port) == (2, 40000)


def test_requeued_job_gets_a_fresh_rendezvous_id():
    assert slurm_rendezvous(_env(SLURM_RESTART_COUNT="2"), use_scontrol=False).rdzv_id == "123456_2"
    assert slurm_rendezvous(_env(SLURM_RESTART_COUNT="0"), use_scontrol=False).rdzv_id == "123456"


@pytest.mark.parametrize("value, count", [("8", 8), ("a100:4", 4), ("a100:2,h100:2", 4), ("gpu:h100:8", 8)])
def test_gpus_per_node_formats(value, count):
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": value}) == count


def test_cpu_allocation_gets_one_process():
    r = slurm_rendezvous(_env(SLURM_GPUS_ON_NODE=None), use_scontrol=False)
    assert r.nproc_per_node == 1


@pytest.mark.parametrize("change, words", [
    ({"SLURM_JOB_NUM_NODES": None}, "SLURM_JOB_NUM_NODES"),
    ({"SLURM_NODEID": None}, "SLURM_NODEID"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NUM_NODES": "3"}, "expands to 4 hosts"),
    ({"SLURM_NODEID": "4"}, "SLURM_NODEID=4"),
    ({"SLURM_JOB_NUM_NODES": "four"}, "not an integer"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT"),
    ({"SLURM_GPUS_ON_NODE": "x"}, "SLURM_GPUS_ON_NODE"),
])
def test_bad_environment_names_the_variable(change, words):
    with pytest.raises(SlurmEnvError, match=words):
        slurm_rendezvous(_env(**change), use_scontrol=False)


def test_scontrol_is_preferred_when_on_path(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\necho hostA; echo hostB\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert slurm_env.hostnames("whatever[1-2]") == ["hostA", "hostB"]
    assert slurm_env.hostnames("whatever[1-2]", use_scontrol=False) == ["whatever1", "whatever2"]
