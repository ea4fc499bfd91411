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
  # Commands pdsh runs over ssh get this container's environment (PATH with the virtualenv, CUDA and
  # NCCL variables of the base image, ...): sshd reads ~/.ssh/environment (PermitUserEnvironment).
  local line name
  while IFS= read -r -d '' line; do
    name=${line%%=*}
    case $name in HOME | PWD | OLDPWD | SHLVL | _ | HOSTNAME | TERM | MEGATRON_GPT_SSHD) continue ;; esac
    if [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ && $line != *$'\n'* ]]; then printf '%s\n' "$line"; fi
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
