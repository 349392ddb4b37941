"""Two nodes on one machine: the CPU rehearsal of a cluster run (docs/multinode.md).

Each "node" is its own launcher process with one CPU rank (`--nnodes 2`, node ranks 0 and 1),
rendezvous over TCP, both writing the same --out (a shared filesystem, as NFS on a cluster):

* DeepSpeed's own launcher, one per node: `deepspeed --hostfile H --no_ssh --node_rank R ...`
  (what `deepspeed --hostfile H` runs on every node over pdsh), over loopback;
* torchrun, one per node (`--nnodes 2 --node_rank R`), over loopback, killed and resumed;
* DeepSpeed's launcher again, each node in its own network namespace joined by a veth pair
  (10.x addresses private to the test): a real network hop, no shared loopback (needs root);
* node 1 with a private disk at --out's path (`unshare -m` + a bind mount): what happens without
  a shared filesystem: ptlm must refuse before training.

Every multi-node run must train as the same global batch on one node does (the per-step losses of
a single-node 2-rank run, within 1e-4), leave complete checkpoints, and resume (`--resume auto`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from ptlm.run.machine import faults
from ptlm.run.machine.distributed import free_port
from tests.support import ROOT
from tests.support import losses, records, tiny_model

STEPS = 6
SAVE_EVERY = 3
# ZeRO-2: optimizer state partitioned across the nodes, so each node writes its own shard.
COMMON = ["--global-batch", 8, "--micro-batch", 4, "--zero", 2, "--max-steps", STEPS,
          "--save-every", SAVE_EVERY, "--no-export"]
RUN_TIMEOUT = 300  # seconds for one launch of all nodes (a run takes ~15-35 s here)
GRACE = 30  # seconds the other nodes get to exit after one node failed, before they are killed
IFNAME = "ptlm0"  # the veth end's name inside both namespaces (as "eth0" on every cluster node)


# ------------------------------------------------------------------------------ helpers

def train_args(data, out, model, *extra) -> list[str]:
    return ["launch/train.py", "--model", str(model), "--from-scratch", "--data", str(data),
            "--out", str(out), "--lr", "3e-3", "--seed", "0", *map(str, COMMON),
            *map(str, extra)]


def base_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", **extra}


def write_hostfile(path: Path) -> Path:
    """DeepSpeed's hostfile: one line per node, `slots` = ranks (GPUs) on that node."""
    path.write_text("node0 slots=1\nnode1 slots=1\n")
    return path


def deepspeed_node(hostfile, node_rank, addr, port, args) -> list[str]:
    """What `deepspeed --hostfile H ...` runs on node R over pdsh, started by hand instead."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
            "--no_ssh", "--node_rank", str(node_rank), "--master_addr", addr,
            "--master_port", str(port), *args]


def torchrun_node(node_rank, addr, port, args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
            "1", "--node_rank", str(node_rank), "--master_addr", addr, "--master_port",
            str(port), *args]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher, its process group and every descendant (torchrun starts its workers
    in sessions of their own, so the launcher's process group alone would miss them)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
    except ProcessLookupError:
        pass
    for kid in kids:
        try:
            kid.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- {path.name} ---\n{text[-n:]}"


def launch(cmds: list[list[str]], logs: Path, envs: list[dict] | None = None,
           timeout: float = RUN_TIMEOUT) -> list[int]:
    """Start every node's launcher at once; wait for all of them, within `timeout`.

    A node that fails can leave the others blocked in a collective or the rendezvous: they get
    GRACE seconds to notice, then their process trees are killed. Returns the exit codes."""
    logs.mkdir(parents=True, exist_ok=True)
    envs = envs or [base_env()] * len(cmds)
    procs, files = [], []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs)):
            f = open(logs / f"node{i}.log", "w")
            files.append(f)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        first_failure = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if now > deadline or (first_failure is not None and now > first_failure + GRACE):
                break
            time.sleep(0.2)
        timed_out = time.monotonic() > deadline
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
        for f in files:
            f.close()
    if timed_out:
        pytest.fail(f"nodes still running after {timeout} s: killed\n"
                    + "\n".join(tail(logs / f"node{i}.log") for i in range(len(cmds))))
    return [p.returncode for p in procs]


def launch_ok(cmds, logs, envs=None) -> None:
    codes = launch(cmds, logs, envs)
    assert codes == [0] * len(cmds), f"exit codes {codes}\n" + "\n".join(
        tail(logs / f"node{i}.log") for i in range(len(cmds)))


def check_like_one_node(out: Path, reference: Path) -> None:
    """Per-step losses as on one node; rank 0 alone wrote metrics/report; complete checkpoints
    holding both ranks' files (each node wrote its own into the shared folder)."""
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "one record per step"
    assert losses(out) == pytest.approx(losses(reference), abs=1e-4)
    final = lambda run: [e["val_loss"] for e in records(run, "eval") if e["tag"] == "final"]
    assert final(out) == pytest.approx(final(reference), abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["steps"] == STEPS and summary["run"]["global_batch"] == 8
    assert "| seq len | epochs |" in (out / "report.md").read_text()
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        ckpt = out / "checkpoints" / f"step{step:08d}"
        marker = json.loads((ckpt / "ptlm_complete.json").read_text())
        assert marker["step"] == step and marker["world_size"] == 2
        for rank in (0, 1):  # rank 1's files come from node 1
            assert (ckpt / f"rng_rank{rank}.pt").exists()
            assert (ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").exists()
        assert (ckpt / "mp_rank_00_model_states.pt").exists()


def hardware_of(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())["hardware"]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("mn_model") / "opt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dataset, model):
    """One node, two ranks, the same global batch: `deepspeed --num_gpus 2 ...`."""
    root = tmp_path_factory.mktemp("mn_ref")
    out = root / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), *train_args(demo_dataset, out, model)]
    launch_ok([cmd], root / "logs")
    return out


@pytest.fixture(scope="module")
def deepspeed_two_nodes(tmp_path_factory, demo_dataset, model):
    """Two DeepSpeed launchers (node ranks 0 and 1), one CPU rank each, over loopback."""
    root = tmp_path_factory.mktemp("mn_ds")
    out, hostfile, port = root / "run", write_hostfile(root / "hostfile"), free_port()
    args = train_args(demo_dataset, out, model)
    launch_ok([deepspeed_node(hostfile, r, "127.0.0.1", port, args) for r in (0, 1)],
              root / "logs")
    return out, root / "logs"


@pytest.fixture
def netns_pair():
    """Two network namespaces joined by a veth pair: node 0 at 10.213.0.1, node 1 at
    10.213.0.2, the interface named IFNAME in both. Created and deleted here."""
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux-only")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (apt-get install iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN)")
    tag = uuid.uuid4().hex[:8]
    names = [f"ptlm-{tag}-n0", f"ptlm-{tag}-n1"]
    addrs = ["10.213.0.1", "10.213.0.2"]

    def ip(*args):
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)

    made = []
    try:
        for name in names:
            r = ip("netns", "add", name)
            if r.returncode != 0:
                pytest.skip(f"`ip netns add` not permitted here: {r.stderr.strip()}")
            made.append(name)
        steps = [("link", "add", IFNAME, "netns", names[0], "type", "veth", "peer", "name",
                  IFNAME, "netns", names[1])]
        for name, addr in zip(names, addrs):
            steps += [("-n", name, "addr", "add", f"{addr}/24", "dev", IFNAME),
                      ("-n", name, "link", "set", IFNAME, "up"),
                      ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            r = ip(*step)
            if r.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed: {r.stderr.strip()}")
        yield names, addrs
    finally:
        for name in made:  # deleting a namespace deletes its end of the veth pair too
            ip("netns", "del", name)


@pytest.fixture
def private_mount():
    """node_cmd(cmd, shared, private): cmd run in a mount namespace of its own, where `private`
    is bind-mounted over `shared`: a node whose disk is not the others' (no shared filesystem)."""
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("no `unshare` (util-linux) to give a node a private filesystem")
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root (CAP_SYS_ADMIN)")
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --bind / /mnt"], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"`unshare -m` + bind mount not permitted here: {r.stderr.strip()}")

    def node_cmd(cmd, shared: Path, private: Path) -> list[str]:
        return ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                "sh", str(private), str(shared), *cmd]

    return node_cmd


# ------------------------------------------------------------------------------ tests

def test_two_nodes_deepspeed_launcher_train_like_one_node(deepspeed_two_nodes, reference):
    out, logs = deepspeed_two_nodes
    check_like_one_node(out, reference)
    for rank in (0, 1):  # two launchers, each its own node with one local rank
        log = (logs / f"node{rank}.log").read_text()
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log
    assert "done: 6 steps" in (logs / "node0.log").read_text()


def test_two_nodes_deepspeed_launcher_plan_sees_two_nodes(deepspeed_two_nodes):
    out, _ = deepspeed_two_nodes
    hw = hardware_of(out)
    assert (hw["nodes"], hw["gpus_per_node"]) == (2, 1)


def test_two_nodes_torchrun_killed_then_resumed(tmp_path, demo_dataset, model, reference):
    """torchrun on each node; every rank dies (SIGKILL) after step 4, one step after the step-3
    checkpoint; relaunched with --resume auto, both nodes restore step 3 from the shared folder
    (node 1 its own ZeRO-2 optimizer shard and RNG) and finish exactly as one node does."""
    out = tmp_path / "run"
    port = free_port()
    cmds = [torchrun_node(r, "127.0.0.1", port, train_args(demo_dataset, out, model))
            for r in (0, 1)]
    kill = base_env(**{faults.KILL_AFTER_STEP_ENV: "4"})
    codes = launch(cmds, tmp_path / "logs_cut", envs=[kill, kill])
    assert all(c != 0 for c in codes), f"the killed run exited {codes}"
    assert len(losses(out)) == 4
    assert (out / "checkpoints" / "step00000003" / "ptlm_complete.json").exists()

    port = free_port()
    launch_ok([torchrun_node(r, "127.0.0.1", port, train_args(demo_dataset, out, model,
                                                              "--resume", "auto"))
               for r in (0, 1)], tmp_path / "logs_resume")
    assert "resumed from" in (tmp_path / "logs_resume" / "node0.log").read_text()
    assert "step00000003 at step 3" in (tmp_path / "logs_resume" / "node0.log").read_text()
    check_like_one_node(out, reference)
    # torchrun sets LOCAL_WORLD_SIZE: the plan sees 2 nodes of 1 rank each
    hw = hardware_of(out)
    assert (hw["nodes"], hw["gpus_per_node"]) == (2, 1)


def test_two_nodes_in_network_namespaces(tmp_path, demo_dataset, model, reference, netns_pair):
    """Each node in its own network namespace: rendezvous and gloo traffic cross a veth link to
    10.213.0.1. GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) names the interface: without it
    gloo advertises the hostname's address (127.0.0.1 here) and the nodes never connect."""
    names, addrs = netns_pair
    out, hostfile, port = tmp_path / "run", write_hostfile(tmp_path / "hostfile"), free_port()
    args = train_args(demo_dataset, out, model)
    cmds = [["ip", "netns", "exec", names[r], *deepspeed_node(hostfile, r, addrs[0], port, args)]
            for r in (0, 1)]
    env = base_env(GLOO_SOCKET_IFNAME=IFNAME)
    launch_ok(cmds, tmp_path / "logs", [env, env])
    check_like_one_node(out, reference)


def test_run_folder_not_shared_fails_before_training(tmp_path, demo_dataset, model,
                                                     private_mount):
    shared, private = tmp_path / "shared", tmp_path / "node1disk"
    shared.mkdir()
    private.mkdir()
    out, hostfile, port = shared / "run", write_hostfile(tmp_path / "hostfile"), free_port()
    args = train_args(demo_dataset, out, model)
    cmds = [deepspeed_node(hostfile, 0, "127.0.0.1", port, args),
            private_mount(deepspeed_node(hostfile, 1, "127.0.0.1", port, args), shared, private)]
    codes = launch(cmds, tmp_path / "logs")
    trained = (out / "metrics.jsonl").exists() and len(records(out, "train")) > 0
    node1_files = sorted(str(p.relative_to(private)) for p in private.rglob("*.pt"))
    assert not trained and all(c != 0 for c in codes), \
        f"exit codes {codes}; files on node 1's own disk: {node1_files}"
    assert "not shared" in (tmp_path / "logs" / "node0.log").read_text()
