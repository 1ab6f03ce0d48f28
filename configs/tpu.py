r"""TPU VM config: the default run on a v4-8 or v5e-8 (one host or a slice).

Single-host TPU VM (run on the VM; see docs/scaling.md for the setup):

  python launch.py --config configs/tpu.py:bucket=MY_BUCKET --workdir runs/tpu

Multi-host pod slice (every host runs the same command; jax.distributed
finds the coordinator itself on TPU VMs; the workdir must be one folder that
every host sees at the same path, e.g. a Filestore/NFS mount or the bucket
mounted with gcsfuse, because orbax writes checkpoints from all hosts):

  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
      "cd mnist_jax && .venv/bin/python launch.py \
       --config configs/tpu.py:bucket=MY_BUCKET,bf16 \
       --workdir /mnt/shared/mnist_jax/runs/tpu_bf16"

Config args (comma-separated): `bucket=NAME` reads TFDS data from
gs://NAME/tensorflow_datasets (prepared once, see docs/scaling.md) and keeps the
persistent compilation cache in gs://NAME/jax_cache; `bf16` computes
activations in bfloat16 (parameters and optimizer state stay float32).

Expected: the tutorial's hyperparameters and global batch, so the same
>= 99.2% test accuracy as the default config. NOT measured on a TPU: this
project's multi-device tests run on a CPU that simulates 8 devices.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config with TPU-VM overrides; see the module docstring."""
  config = default.get_config()
  # The global batch: divides by the 4 devices of a v4-8 (4 chips, megacore)
  # and the 8 of a v5e-8, as every multiple of 8 does; 512 is the tutorial's,
  # so the schedule and the expected accuracy are the default config's.
  config.batch_size = 512
  config.eval_batch_size = 1000  # 125 per v5e-8 device, 250 per v4-8 device.
  # A TPU step of this small network takes microseconds; many steps per host
  # call keep the TPU busy instead of waiting on Python.
  config.steps_per_dispatch = 50
  config.checkpoint_every_steps = 500  # A multiple of steps_per_dispatch.
  config.data.source = 'tfds'
  config.data.download = 'false'  # Prepared once in the bucket (docs/scaling.md); hosts never download.
  config.write_report = True

  for part in filter(None, (arg or '').split(',')):
    key, _, value = part.partition('=')
    if key == 'bf16' and not value:
      config.dtype = 'bfloat16'
    elif key == 'bucket' and value:
      config.data.dir = f'gs://{value}/tensorflow_datasets'
      config.compilation_cache_dir = f'gs://{value}/jax_cache'
    else:
      raise ValueError(f'Unknown config argument {part!r}; use bf16 and/or '
                       'bucket=NAME, comma-separated.')
  return config
