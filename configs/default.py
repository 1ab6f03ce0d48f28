r"""Default config: the TF1 tutorial's CNN and hyperparameters on MNIST.

Train and evaluate (prints the test accuracy after every epoch and, at the end,
`Final test accuracy: NN.NN%`):

  python launch.py --config configs/default.py --workdir runs/default

Override anything from the command line, e.g. `--config.batch_size=128`.
Short local run used by CI (a few hundred steps, >= 95% test accuracy):

  python launch.py --config configs/default.py:smoke --workdir /tmp/smoke

Expected (measured on a 2-vCPU AMD EPYC, jax 0.10.2, see the README's "Results"):
99.26% final test accuracy after 20 epochs (2,140 steps of 512 images) in
~8.5 minutes of wall time (~2,400 training images/s); 99.0% is first reached
after epoch 6 (142 s of training). The smoke run reaches ~98.5% in ~1.5 min.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the default config; `arg='smoke'` gives a short CI run."""
  config = ml_collections.ConfigDict()

  # --- Data ---
  config.data = ml_collections.ConfigDict()
  config.data.source = 'tfds'  # 'tfds' (tfds.load(data.name)) or 'idx' (MNIST_data/ IDX files).
  config.data.name = 'mnist'  # TFDS dataset of 28x28x1 uint8 images + int label: 'mnist', 'fashion_mnist', 'kmnist', ...; 'idx' ignores it (reads the folder's four files).
  config.data.dir = ''  # TFDS data dir or IDX folder; '' = TFDS_DATA_DIR / TFDS default.
  config.data.num_validation = 5000  # First N training images validate (tutorial: 5,000).
  config.data.download = 'auto'  # 'auto': TFDS downloads MNIST once if missing; 'false': never (offline/TPU).
  config.data.cache_dir = ''  # Decoded-TFDS .npz cache; '' = ~/.cache/mnist_jax, 'none' = off.

  # --- Model (tutorial's network) ---
  config.num_classes = 10  # Output classes.
  config.dropout_keep_prob = 0.5  # Keep probability of the dropout after fc3 (training only).
  config.lowering = 'auto'  # XLA ops: 'fast' (CPU rewrite), 'reference' (nn.Conv); 'auto' = fast on CPU only.
  config.dtype = 'float32'  # Activation/compute dtype ('float32' or 'bfloat16'); params stay f32.
  config.batch_norm = False  # BatchNorm before conv1's and conv2's ReLU (not in the tutorial); running stats are checkpointed.
  config.augment_shift = 0  # Training images moved by up to N pixels each way (random per image and step); 0 = off (tutorial).

  # --- Parallelism (see docs/scaling.md) ---
  config.parallelism = 'jit'  # 'jit': one program over a mesh of all devices; 'pmap': classic pmap.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = 'auto'  # jax.distributed: 'auto' (coordinator given or TPU VM), 'yes', 'no'.
  config.distributed.coordinator_address = ''  # host:port of process 0; '' = JAX_COORDINATOR_ADDRESS / auto.
  config.distributed.num_processes = 0  # 0 = JAX_NUM_PROCESSES / auto-detected.
  config.distributed.process_id = -1  # -1 = JAX_PROCESS_ID / auto-detected.

  # --- Optimisation (tutorial's values) ---
  config.batch_size = 512  # Global training batch size.
  config.initial_learning_rate = 0.001  # Adam learning rate at step 0.
  config.learning_rate_decay_factor = 0.95  # Multiplier applied every decay period.
  config.num_epochs_per_decay = 1.0  # Decay period in epochs (staircase).
  config.weight_decay = 0.0005  # L2 on conv kernels: adds weight_decay * w to the gradient.
  config.adam_b1 = 0.9  # Adam beta1.
  config.adam_b2 = 0.999  # Adam beta2.
  config.adam_eps = 1e-8  # Adam epsilon (TF1 AdamOptimizer's default).

  # --- Duration ---
  config.num_epochs = 20  # Training epochs.
  config.num_train_steps = -1  # -1 = derived from num_epochs; otherwise a cap on steps.
  config.seed = 0  # Seeds parameter init, dropout and the data order.

  # --- Evaluation and logging ---
  config.eval_batch_size = 1000  # Evaluation batch size (last batch padded and masked).
  config.eval_every_epochs = 1  # Evaluate validation and test every N epochs (and at the end).
  config.log_every_steps = 50  # Write training scalars every N steps.
  config.compilation_cache_dir = ''  # JAX persistent cache; '' = ~/.cache/mnist_jax/jax_cache, 'none' = off.
  config.steps_per_dispatch = 0  # Training steps per host call (one lax.scan); 0 = auto (CPU: 10, GPU/TPU: an epoch); 1 = one jit per step.
  config.overlap_epoch_end = 'auto'  # Dispatch the next epoch's first steps before the epoch-end work: 'auto' (GPU/TPU), 'yes', 'no'.
  config.profile_steps = 0  # Trace N training steps with the JAX profiler into the workdir; 0 = off.
  config.write_report = True  # After training, write <workdir>/report/ (plots + report.md).

  # --- Checkpoints ---
  config.checkpoint_every_steps = 0  # Save every N steps; 0 = at every epoch end (and at the end).
  config.max_checkpoints_to_keep = 10  # Keep the last N checkpoints (tutorial: 10).
  config.init_from = ''  # Fine-tune: start from the params (and model state) of this workdir/checkpoint ('' = no).
  config.eval_step = -1  # --mode eval: evaluate this step's checkpoint; -1 = the latest.

  if arg == 'smoke':
    config.num_train_steps = 300  # ~2.8 epochs: >= 98% test accuracy in a few minutes.
    config.num_epochs = 3
    config.log_every_steps = 25
  elif arg:
    raise ValueError(f"Unknown config argument {arg!r}; use 'smoke' or nothing.")
  return config
