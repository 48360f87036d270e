"""Multi-host start-up and stopping: SLURM device ids, the device count against the
mesh, and a pre-emption signal that reaches one process of two."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import pytest

from elas_jax import sharding
from elas_jax.cli import distributed
from elas_jax.errors import ConfigError
from tests.helpers import ROOT, TINY_TRAIN_FLAGS, load_config, step_losses


def _slurm(**overrides) -> dict[str, str]:
  """The environment srun gives task 2 of ``--nodes=4 --ntasks-per-node=1 --gpus-per-node=8``."""
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
         "SLURM_STEP_NUM_NODES": "4", "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
         "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  env.update(overrides)
  return {k: v for k, v in env.items() if v is not None}


ALL8 = list(range(8))


@pytest.mark.parametrize("env,want", [
    (_slurm(), ALL8),  # one task per node: all of the node's GPUs
    (_slurm(CUDA_VISIBLE_DEVICES=None), ALL8),  # no CUDA_VISIBLE_DEVICES: SLURM's GPU count
    (_slurm(CUDA_VISIBLE_DEVICES="4,5"), [0, 1]),  # ids count within the visible GPUs
    # one task per GPU: jax's own choice (GPU SLURM_LOCALID) stands
    (_slurm(SLURM_NTASKS="32", SLURM_STEP_TASKS_PER_NODE="8(x4)", SLURM_LOCALID="5"), None),
    (_slurm(SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="3"), ALL8),  # uneven: node 3 has one
    (_slurm(SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="0"), None),
    (_slurm(JAX_LOCAL_DEVICE_IDS="3"), None),  # the user's choice: jax reads it
    (_slurm(CUDA_VISIBLE_DEVICES="NoDevFiles", SLURM_GPUS_ON_NODE=None), None),  # no GPUs
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, None),  # not under SLURM
])
def test_slurm_local_device_ids(env, want):
  assert distributed.slurm_local_device_ids(env) == want


def test_jax_slurm_detection_gets_every_gpu_of_a_one_task_node(monkeypatch):
  # jax's own cluster detection (what jax.distributed.initialize runs): alone it
  # gives a one-task-per-node process GPU 0 only; with our ids, all eight.
  clusters = pytest.importorskip("jax._src.clusters")
  for k, v in _slurm().items():
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
  detect = lambda ids: clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, ids, None, None)
  address, n, i, ids = detect(distributed.slurm_local_device_ids())
  assert (address.split(":")[0], n, i, list(ids)) == ("gpu001", 4, 2, ALL8)
  assert list(detect(None)[3]) == [0]  # the bug this fixes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_START = """
import jax
from elas_jax.cli import distributed
distributed.initialize()
print("RESULT", jax.config.read("jax_cuda_visible_devices"), jax.process_count(), jax.process_index())
"""


def test_faked_slurm_start_up_gives_jax_every_gpu():
  # The real start-up (distributed.initialize -> jax.distributed.initialize with
  # jax's SLURM detection) in a one-task job: jax's GPU client then uses the
  # devices in jax_cuda_visible_devices: all eight (jax alone would set "0").
  env = dict(os.environ, **_slurm(SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_NODEID="0",
                                  SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
                                  SLURM_STEP_TASKS_PER_NODE="1"),
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(_free_port()))
  env.pop("JAX_LOCAL_DEVICE_IDS", None)
  p = subprocess.run([sys.executable, "-c", _START], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert p.stdout.split("RESULT ", 1)[1].split() == ["0,1,2,3,4,5,6,7", "1", "0"]


def test_too_few_devices_for_the_mesh_names_both_counts_and_the_processes():
  # Four one-GPU processes (the symptom of the SLURM bug) for an fsdp=8 mesh.
  cfg = load_config("configs/tiny.py", "elas")
  cfg.mesh.fsdp = 8
  four = [types.SimpleNamespace(process_index=p) for p in range(4)]
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh(cfg.mesh, four)
  msg = str(e.value)
  assert "\n" not in msg
  assert "(8 devices) do not divide the 4 available devices" in msg
  assert "4 processes with 1 local device(s) each" in msg
  cfg.mesh.data = 1
  with pytest.raises(ConfigError, match=r"needs 8 devices but 4 are available \(4 processes"):
    sharding.make_mesh(cfg.mesh, four)
  with pytest.raises(ConfigError) as e:  # one process: no process count to add
    sharding.make_mesh(cfg.mesh, [types.SimpleNamespace(process_index=0)] * 4)
  assert str(e.value).endswith("needs 8 devices but 4 are available")


# train.py with a pause in every metrics write, so that a signal sent after the
# first steps lands well before the end of the run.
_SLOW_TRAIN = """
import sys, time
from elas_jax import trainer
from elas_jax.cli import train as train_main
write = trainer.MetricWriter.write
trainer.MetricWriter.write = lambda self, step, m: (time.sleep(0.3), write(self, step, m))
sys.argv = ["train.py", *sys.argv[1:]]
train_main.run()
"""


def _two_processes(workdir, slow: bool = False) -> list[subprocess.Popen]:
  steps = ["--config.train.steps=8", "--config.train.eval_every=8", "--config.train.ckpt_every=100"]
  port = _free_port()
  prog = ["-c", _SLOW_TRAIN] if slow else ["train.py"]
  return [subprocess.Popen([sys.executable, *prog, *TINY_TRAIN_FLAGS, *steps, f"--workdir={workdir}",
                            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                            f"--process_id={i}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _finish(procs, timeout=300) -> list[tuple[str, str]]:
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
  straight = tmp_path / "straight"
  _finish(_two_processes(straight))
  run = tmp_path / "preempted"
  procs = _two_processes(run, slow=True)
  metrics = run / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 hears nothing
  outs = _finish(procs, timeout=120)  # stopping alone, a process would hang its peer
  stopped = [json.loads(out.strip().splitlines()[-1])["step"] for out, _ in outs]
  assert stopped[0] == stopped[1] < 8
  for _, err in outs:
    assert f"SIGTERM: checkpointed step {stopped[0]}" in err
  assert os.listdir(run / "checkpoints") == [str(stopped[0])]
  assert max(step_losses(str(run))) == stopped[0]
  _finish(_two_processes(run))  # the same command resumes
  assert step_losses(str(run)) == step_losses(str(straight))  # float equality, every step once
