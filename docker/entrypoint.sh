#!/bin/bash
# Entrypoint of the megatron-gpt image (runs as the image's non-root user).
#
#   (no arguments) | --help          megatron-gpt --help
#   train configs/quickstart.yml ... megatron-gpt train ...   (any megatron-gpt subcommand or option)
#   sshd                             sshd in the foreground: a node of a pdsh cluster
#   bash | python | pdsh | ...       that program (any executable on PATH)
#
# MEGATRON_GPT_SSHD=1 starts sshd in the background before the command (a node that also launches).
# sshd listens on port 2222 as this user, key login only. The cluster's key pair comes from
# MEGATRON_GPT_SSH_DIR (default /ssh): a folder the nodes share (a volume or a read-only secret)
# holding id_ed25519 (+ .pub, optional authorized_keys). If it holds no key and is writable, the
# first node to start creates one there. Nothing secret is in the image: host keys are made here too.
set -euo pipefail

ssh_dir=${MEGATRON_GPT_SSH_DIR:-/ssh}
sshd_args=(-f /etc/megatron-gpt/sshd_config -h "$HOME/.ssh/ssh_host_ed25519_key"
           -o "PidFile=$HOME/.ssh/sshd.pid")

die() {
  echo "megatron-gpt-entrypoint: error: $*" >&2
  exit 1
}

cluster_key() {
  local key=$ssh_dir/id_ed25519
  if [ ! -f "$key" ]; then
    [ -d "$ssh_dir" ] && [ -w "$ssh_dir" ] || die "no ssh key $key, and $ssh_dir is not a writable folder to \
create one in: mount the folder the nodes share at $ssh_dir (or set MEGATRON_GPT_SSH_DIR)"
    # Under a lock (nodes start at once), into a temp folder, then renamed: public key first, so a
    # private key present means a complete pair.
    (
      flock 9
      if [ ! -f "$key" ]; then
        tmp=$(mktemp -d "$ssh_dir/.keygen.XXXXXX")
        ssh-keygen -q -t ed25519 -N "" -C "megatron-gpt cluster" -f "$tmp/id_ed25519"
        mv -f "$tmp/id_ed25519.pub" "$key.pub"
        mv -f "$tmp/id_ed25519" "$key"
        rmdir "$tmp"
        echo "megatron-gpt-entrypoint: created the cluster key pair $key" >&2
      fi
    ) 9>"$ssh_dir/.keygen.lock"
  fi
  [ -r "$key" ] && [ -r "$key.pub" ] || die "cannot read $key and $key.pub as $(id -un) (uid $(id -u)): make them \
readable by this uid"
}

publish_host_key() {
  # This node's host key, under every name and address it may be reached by, into the known_hosts
  # the nodes share ($ssh_dir/known_hosts): ssh then checks host keys strictly (docker/ssh_config).
  local known=$ssh_dir/known_hosts names name drop=()
  ln -sfn "$known" "$HOME/.ssh/known_hosts_cluster"
  [ -w "$ssh_dir" ] || { [ -f "$known" ] && return 0; } || die "$ssh_dir is read-only and holds no known_hosts: \
put the nodes' host keys there ([NAME]:2222 KEY lines), or mount it writable"
  names=$(hostname; hostname -f 2>/dev/null || true; hostname -I 2>/dev/null | tr ' ' '\n')
  names=$(printf '%s\n' $names | sort -u)
  for name in $names; do drop+=(-e "[$name]:2222 "); done
  (
    flock 9
    touch "$known"
    { grep -v -F "${drop[@]}" "$known" || true  # this node's old key (a restart makes a new one)
      for name in $names; do
        printf '[%s]:2222 %s\n' "$name" "$(cut -d' ' -f1,2 "$HOME/.ssh/ssh_host_ed25519_key.pub")"
      done; } > "$known.tmp.$$"
    mv -f "$known.tmp.$$" "$known"
  ) 9>"$ssh_dir/.keygen.lock"
}

setup_ssh() {
  cluster_key
  install -d -m 700 "$HOME/.ssh"
  install -m 600 "$ssh_dir/id_ed25519" "$HOME/.ssh/id_ed25519"
  install -m 644 "$ssh_dir/id_ed25519.pub" "$HOME/.ssh/id_ed25519.pub"
  { cat "$ssh_dir/id_ed25519.pub"; [ ! -f "$ssh_dir/authorized_keys" ] || cat "$ssh_dir/authorized_keys"; } \
    > "$HOME/.ssh/authorized_keys.tmp"
  chmod 600 "$HOME/.ssh/authorized_keys.tmp"
  mv -f "$HOME/.ssh/authorized_keys.tmp" "$HOME/.ssh/authorized_keys"
  [ -f "$HOME/.ssh/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$HOME/.ssh/ssh_host_ed25519_key"
  publish_host_key
  # Commands pdsh runs over ssh get the parts of this container's environment a rank needs (PATH
  # with the virtualenv, the CUDA/NCCL settings of the base image, ...): sshd reads
  # ~/.ssh/environment (PermitUserEnvironment). An allow-list: API keys and tokens in the container's
  # environment stay out of that file (launches carry their own secrets in a 0600 file);
  # MEGATRON_GPT_SSH_ENV names more variables to pass.
  local line name extra
  read -r -a extra <<< "${MEGATRON_GPT_SSH_ENV:-}"
  while IFS= read -r -d '' line; do
    name=${line%%=*}
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ && $line != *$'\n'* ]] || continue
    case $name in
      PATH | LD_LIBRARY_PATH | LIBRARY_PATH | VIRTUAL_ENV | PYTHONPATH | LANG | LC_* | TZ | CUDA_* | NCCL_* | \
      NVIDIA_* | GLOO_* | OMP_* | MKL_* | UCX_* | DS_ACCELERATOR | TORCH_EXTENSIONS_DIR | PIP_*) ;;
      *) [[ " ${extra[*]} " == *" $name "* ]] || continue ;;
    esac
    printf '%s\n' "$line"
  done < <(env -0) > "$HOME/.ssh/environment.tmp"
  chmod 600 "$HOME/.ssh/environment.tmp"
  mv -f "$HOME/.ssh/environment.tmp" "$HOME/.ssh/environment"
}

if [ "${1:-}" = sshd ]; then
  [ $# -eq 1 ] || die "'sshd' takes no arguments (got: ${*:2})"
  setup_ssh
  echo "megatron-gpt-entrypoint: sshd on port 2222 for $(id -un) on $(hostname)" >&2
  exec /usr/sbin/sshd -D -e "${sshd_args[@]}"
fi
if [ "${MEGATRON_GPT_SSHD:-0}" = 1 ]; then
  setup_ssh
  /usr/sbin/sshd "${sshd_args[@]}" || die "sshd did not start"
fi
if [ $# -eq 0 ]; then
  exec megatron-gpt --help
fi
# A program on PATH runs as given; anything else (train, export-hf, --version, ...) is megatron-gpt's.
if [[ $1 != -* ]] && type -P -- "$1" >/dev/null; then
  exec "$@"
fi
exec megatron-gpt "$@"
