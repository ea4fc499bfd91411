"""Hostile and careless launch input (issue 17), through stand-in pdsh / ssh / mpirun / srun that
record their argv and run the node command the way the real ones do (pdsh: one line through a
shell; mpirun, srun: argv as is, -x K=V into the environment). The rank is a probe that parses its
arguments with the real entry point's parser (training.main.parse_args, launch file included) and
records what it got, so no training starts. Injected commands would create marker files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yml"
SECRET = "s3cr3t-Value-42"
DB_PASSWORD = "hunter2-pw"

PROBE = """
import json, os, stat, sys
from megatron_gpt.training.main import parse_args
args = parse_args(sys.argv[1:])
launch = [os.path.expanduser(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--launch-file=")]
out = {"argv": sys.argv[1:], "overrides": args.overrides, "launch_file_mode":
       [oct(stat.S_IMODE(os.stat(p).st_mode)) for p in launch],
       "env": {k: os.environ.get(k) for k in ("MY_VALUE", "WANDB_API_KEY", "DATABASE_URL", "NCCL_WEIRD")}}
path = os.path.join(os.environ["PROBE_OUT"], f"rank-{os.environ.get('RANK', '0')}-{os.getpid()}.json")
open(path, "w").write(json.dumps(out))
"""

PDSH = r'''#!/usr/bin/env python3
# stand-in pdsh: records argv; `-w a,b` hosts; the rest joined by spaces is one remote shell line
import os, subprocess, sys
args = sys.argv[1:]
open(os.environ["RECORD"] + "/pdsh.argv", "a").write(repr(args) + "\n")
hosts, i = [], 0
while args[i].startswith("-"):
    if args[i] == "-w":
        hosts = args[i + 1].split(","); i += 2
    elif args[i] == "-f":
        i += 2
    else:
        i += 1
line = " ".join(args[i:]).replace("megatron_gpt.training.main", "probe_rank")
code = 0
for index, host in enumerate(hosts):
    home = os.path.join(os.environ["HOMES"], host)
    os.makedirs(home, exist_ok=True)
    code |= subprocess.run(["bash", "-c", line.replace("%n", str(index))], env={**os.environ, "HOME": home}).returncode
sys.exit(code)
'''

SSH = r'''#!/usr/bin/env python3
# stand-in ssh: records argv; `-o X` options, the host, then the remote command run by bash in
# $HOME with this stdin (as sshd runs it through the user's shell)
import os, subprocess, sys
args = sys.argv[1:]
open(os.environ["RECORD"] + "/ssh.argv", "a").write(repr(args) + "\n")
while args[0].startswith("-"):
    args = args[2:] if args[0] in ("-o", "-p") else args[1:]
host, command = args[0], " ".join(args[1:])
home = os.path.join(os.environ["HOMES"], host)  # each stand-in node has its own home
os.makedirs(home, exist_ok=True)
sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": home}).returncode)
'''

MPIRUN = r'''#!/usr/bin/env python3
# stand-in mpirun: records argv; -x K=V sets K to V exactly, -x K passes K on; the program runs as argv
import os, subprocess, sys
args = sys.argv[1:]
open(os.environ["RECORD"] + "/mpirun.argv", "a").write(repr(args) + "\n")
env, i, n = dict(os.environ), 0, 1
while args[i].startswith("-"):
    if args[i] == "-x":
        name, sep, value = args[i + 1].partition("=")
        if sep:
            env[name] = value
        i += 2
    elif args[i] in ("-n", "-np"):
        n = int(args[i + 1]); i += 2
    elif args[i] in ("--mca", "-mca"):
        i += 3
    elif args[i] in ("-hostfile", "--hostfile"):
        hosts = [line.split()[0] for line in open(args[i + 1]) if line.strip()]
        env["HOSTS"] = " ".join(hosts)
        i += 2
    elif args[i] == "--npernode":
        i += 2
    else:
        i += 1
program = ["probe_rank" if a == "megatron_gpt.training.main" else a for a in args[i:]]
code = 0
hosts = env.get("HOSTS", "").split()
for rank in range(n):
    home = os.path.join(os.environ["HOMES"], hosts[rank]) if hosts else env["HOME"]  # one slot per host
    code |= subprocess.run(program, env={**env, "RANK": str(rank), "HOME": home}).returncode
sys.exit(code)
'''

SRUN = r'''#!/usr/bin/env python3
# stand-in srun: records argv; options up to the program; the program runs as argv, environment passed on
import os, subprocess, sys
args = sys.argv[1:]
open(os.environ["RECORD"] + "/srun.argv", "a").write(repr(args) + "\n")
i = 0
while args[i].startswith("-"):
    i += 1
program = ["probe_rank" if a == "megatron_gpt.training.main" else a for a in args[i:]]
sys.exit(subprocess.run(program).returncode)
'''

TRICKY = {
    "training.generate_prompt": "It costs $5 `id -un` now $(touch MARK_dollar)`touch MARK_tick`",
    "name": "romeo's",
    "logging.wandb_entity": 'say "hi"; touch MARK_semicolon; echo "',
    "logging.wandb_project": "two\nlines",
}
ENV_VALUE = "$(touch MARK_env) \"quoted\" 'single' `touch MARK_env2`"


@pytest.fixture
def stand_ins(tmp_path):
    bin_dir, record, out = tmp_path / "bin", tmp_path / "record", tmp_path / "probe"
    for d in (bin_dir, record, out):
        d.mkdir()
    for name, text in {"pdsh": PDSH, "ssh": SSH, "mpirun": MPIRUN, "srun": SRUN,
                       "ompi_info": "#!/bin/sh\nexit 0\n"}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "probe_rank.py").write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", RECORD=str(record), PROBE_OUT=str(out), HOMES=str(tmp_path / "homes"),
               PYTHONPATH=f"{tmp_path}:{REPO}", WANDB_API_KEY=SECRET, NCCL_WEIRD="a b$(touch MARK_nccl)")
    return tmp_path, work, env


def overrides() -> list[str]:
    sets = [f"{k}={v}" for k, v in TRICKY.items()]
    sets += [f"launcher.env.MY_VALUE={ENV_VALUE}",
             "launcher.env=" + json.dumps({"DATABASE_URL": f"postgres://user:{DB_PASSWORD}@db/x", "MY_VALUE": ENV_VALUE}),
             "training.train_steps=3"]
    return sets


def launch(env, work: Path, *sets: str, dry: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "megatron_gpt", "train", str(TINY), *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(args + (["--dry-run"] if dry else []), cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)


def check_received(tmp_path: Path, work: Path, given: list[str], ranks: int, done) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    probes = [json.loads(p.read_text()) for p in sorted((tmp_path / "probe").glob("rank-*.json"))]
    assert len(probes) == ranks, output[-3000:]
    for probe in probes:
        assert probe["overrides"][-len(given):] == given  # byte for byte, in order
        assert probe["env"]["WANDB_API_KEY"] == SECRET
        assert all(mode == "0o600" for mode in probe["launch_file_mode"])
        assert SECRET not in " ".join(probe["argv"]) and DB_PASSWORD not in " ".join(probe["argv"])
    assert not list(work.glob("MARK*")) and not list(tmp_path.glob("**/MARK*")), "an injected command ran"
    for recorded in (tmp_path / "record").glob("*.argv"):
        text = recorded.read_text()
        assert SECRET not in text and DB_PASSWORD not in text, recorded.name
    assert SECRET not in output and DB_PASSWORD not in output
    assert not list(tmp_path.glob("homes/*/.megatron-gpt-launch-*")), "the launch file outlived the run"


def hostfile(work: Path, *hosts: str) -> Path:
    path = work / "hostfile"
    path.write_text("".join(f"{h} slots=1\n" for h in hosts))
    return path


@pytest.mark.parametrize("kind", ["pdsh", "openmpi"])
def test_deepspeed_runner_values_arrive_verbatim_and_nothing_runs(stand_ins, kind):
    tmp_path, work, env = stand_ins
    given = overrides()
    sets = [*given, f"launcher.type={kind}", f"launcher.hostfile={hostfile(work, 'node1', 'node2')}",
            "launcher.num_nodes=2", "launcher.nproc_per_node=1", "training.global_batch_size=8"]
    done = launch(env, work, *sets)
    check_received(tmp_path, work, sets, 2, done)
    probe = json.loads(next((tmp_path / "probe").glob("rank-*.json")).read_text())
    assert probe["env"]["MY_VALUE"] == ENV_VALUE and probe["env"]["NCCL_WEIRD"] == "a b$(touch MARK_nccl)"
    assert probe["env"]["DATABASE_URL"] == f"postgres://user:{DB_PASSWORD}@db/x"
    shown = launch(env, work, *sets, dry=True)
    assert shown.returncode == 0 and SECRET not in shown.stdout and DB_PASSWORD not in shown.stdout
    assert "launcher.env=***" in shown.stdout


def test_srun_and_mpirun_values_arrive_verbatim(stand_ins):
    tmp_path, work, env = stand_ins
    given = overrides()
    sets = [*given, "launcher.type=slurm", "launcher.nproc_per_node=1"]
    done = launch({**env, "SLURM_JOB_ID": "7"}, work, *sets)
    check_received(tmp_path, work, sets, 1, done)
    for probe in (tmp_path / "probe").glob("*"):
        probe.unlink()
    sets = [*given, "launcher.type=mpirun", "launcher.nproc_per_node=2", "training.global_batch_size=8"]
    done = launch(env, work, *sets)
    check_received(tmp_path, work, sets, 2, done)


def test_sbatch_script_values_arrive_verbatim_and_no_secret_is_written(stand_ins):
    tmp_path, work, env = stand_ins
    script = work / "job.sbatch"
    given = [f"{k}={v}" for k, v in TRICKY.items()] + [f"launcher.env.MY_VALUE={ENV_VALUE}"]
    done = subprocess.run([sys.executable, "-m", "megatron_gpt", "slurm", str(TINY), "--gpus-per-node", "0",
                           "--job-name", "job1", "-o", str(script), *[a for s in given for a in ("--set", s)]],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    run = subprocess.run(["bash", str(script)], cwd=work, capture_output=True, text=True, timeout=120,
                         env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1"})
    assert run.returncode == 0, run.stdout + run.stderr
    probe = json.loads(next((tmp_path / "probe").glob("rank-*.json")).read_text())
    assert probe["overrides"][:len(given)] == given and probe["env"]["MY_VALUE"] == ENV_VALUE
    assert not list(work.glob("MARK*"))
    # a newline or an option in a directive value is refused, naming the option
    for args, option in ((["--job-name", "x\n#SBATCH --wrap=touch MARK"], "--job-name"),
                         (["--partition", "-oops"], "--partition"), (["--set", "name=a\nb"], "--job-name"),
                         (["--log", "a b"], "--output")):
        refused = subprocess.run([sys.executable, "-m", "megatron_gpt", "slurm", str(TINY), *args], cwd=work, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and option in refused.stderr and refused.stdout == "", refused.stderr
    # secrets in any form are refused rather than written
    for secret in ("launcher.env={WANDB_API_KEY: x1y2}", f"launcher.env.DATABASE_URL=postgres://u:{DB_PASSWORD}@h/d",
                   "launcher.env.PGPASS=x1y2"):
        refused = subprocess.run([sys.executable, "-m", "megatron_gpt", "slurm", str(TINY), "--set", secret],
                                 cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "would be written into the script" in refused.stderr, secret


def test_hostile_hosts_and_master_addr_are_refused_before_anything_runs(stand_ins):
    tmp_path, work, env = stand_ins
    base = ["launcher.type=pdsh", "launcher.num_nodes=2", "launcher.nproc_per_node=1", "training.global_batch_size=8"]
    evil = hostfile(work, f"-oProxyCommand=touch$IFS{work}/MARK_proxy", "node2")
    done = launch(env, work, *base, f"launcher.hostfile={evil}")
    assert done.returncode == 2 and "is not a host name" in done.stderr and "hostfile" in done.stderr
    good = hostfile(work, "node1", "node2")
    done = launch(env, work, *base, f"launcher.hostfile={good}", "launcher.master_addr=node1;touch MARK_master")
    assert done.returncode == 2 and "launcher.master_addr" in done.stderr
    assert not list(work.glob("MARK*")) and not (tmp_path / "record" / "ssh.argv").exists()


def test_secrets_in_saved_configs_and_reuse(tmp_path):
    import yaml

    from megatron_gpt.config import config_to_dict, load_config

    cfg = load_config([TINY], ["launcher.secret_env=[CORP_*]", "launcher.env={CORP_THING: abc123, PGPASS: pw1, "
                               f"DATABASE_URL: 'postgres://u:{DB_PASSWORD}@h/d', NCCL_DEBUG: INFO}}"])
    saved = config_to_dict(cfg)["launcher"]["env"]
    assert saved == {"CORP_THING": "***", "PGPASS": "***", "DATABASE_URL": "***", "NCCL_DEBUG": "INFO"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    again = load_config([path])  # reusing a saved config never sets a variable to the mask
    assert again.launcher.env == {"NCCL_DEBUG": "INFO"}


def test_a_failing_run_ends_with_the_rank_error_as_the_last_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "megatron_gpt", "train", str(TINY), "--set", "data.embedded=null",
                           "--set", "data.paths=[/nonexistent/corpus]", "--set", "tokenizer.type=bytes",
                           "--set", "launcher.nproc_per_node=2", "--set", f"logging.run_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-3000:]
    assert last.startswith("rank ") and "error: /nonexistent/corpus.bin: does not exist (from data.paths)" in last, last


@pytest.mark.slow
def test_secrets_given_every_way_reach_no_file_log_or_command_line_of_a_real_run(tmp_path, data_cache):
    """A real 2-rank run (torchrun) with secrets from the shell, launcher.env mapping and --set:
    the ranks get them, and no byte of them is in the output, the run dir or the checkpoint."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_API_KEY=SECRET)
    db = f"postgres://user:{DB_PASSWORD}@db/x"
    sets = ["launcher.nproc_per_node=2", f"data.cache_dir={data_cache}", f"logging.run_dir={tmp_path / 'run'}",
            f"checkpoint.save_dir={tmp_path / 'ckpt'}", "training.train_steps=2", "launcher.secret_env=[CORP_*]",
            "launcher.env=" + json.dumps({"DATABASE_URL": db, "CORP_THING": "corp-secret-9"}),
            "launcher.env.HF_TOKEN=hf-secret-7"]
    done = subprocess.run([sys.executable, "-m", "megatron_gpt", "train", str(TINY),
                           *[a for s in sets for a in ("--set", s)]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    secrets = [SECRET, DB_PASSWORD, "corp-secret-9", "hf-secret-7"]
    output = done.stdout + done.stderr
    assert not [s for s in secrets if s in output]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] + \
            [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets if s.encode() in data], path
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "DATABASE_URL: '***'" in saved and "CORP_THING: '***'" in saved and "HF_TOKEN: '***'" in saved
    assert not list(Path.home().glob(".megatron-gpt-launch-*"))
