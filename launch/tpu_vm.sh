#!/usr/bin/env bash
# A Cloud TPU VM slice (e.g. v4-32 = 4 hosts): the same command on every host;
# --distributed=jax lets jax.distributed find the slice's hosts itself (GCE metadata).
#   TPU=my-tpu ZONE=us-central2-b bash launch/tpu_vm.sh setup
#   TPU=my-tpu ZONE=us-central2-b bash launch/tpu_vm.sh train --config=configs/1b.py --workdir=gs://bucket/runs/1b
# The workdir must be shared storage every host sees (a GCS bucket: orbax writes there directly).
# Mesh: FSDP over all chips (the default); TPUs want batch and FSDP sizes that divide the chips.
set -euo pipefail
: "${TPU:?set TPU=<tpu name>}" "${ZONE:?set ZONE=<zone>}"
REPO=${REPO:-https://github.com/YOUR_ORG/tinyllama_jax.git}
on_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "${1:-}" in
  setup)  # code + the TPU build of jax on every host
    on_all "git clone $REPO tinyllama_jax 2>/dev/null || git -C tinyllama_jax pull; \
      pip install -U 'jax[tpu]>=0.10.2,<0.12' -r tinyllama_jax/requirements.txt" ;;
  train)
    shift
    on_all "cd tinyllama_jax && python -m tinyllama_jax.train --distributed=jax $*" ;;
  bench)  # the step benchmark on the slice (no PyTorch peer on TPU)
    shift
    on_all "cd tinyllama_jax && python -m bench --peer= --distributed=jax $*" ;;
  *) echo "usage: TPU=.. ZONE=.. $0 setup|train|bench [flags]" >&2; exit 2 ;;
esac
