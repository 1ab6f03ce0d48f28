"""Config sweeps: which points to run, how to stop them early, validation.

A config file may define, beside `get_config`, a `get_sweep()` returning one of

* a list of *points*: dicts of overrides with dotted keys, e.g. a grid
  `sweep.product({'initial_learning_rate': [0.001, 0.003],
  'batch_size': [256, 512]})` (`product`, `zipped` and `cross` build them);
* a search space, `sweep.Random({'initial_learning_rate':
  sweep.loguniform(1e-4, 1e-2), 'batch_size': sweep.choice([128, 512])},
  num_samples=8)`: quasi-random (Halton) or random samples, drawn here from a
  seed so that the points are known, validated and named before anything runs;
* a `sweep.Sweep(points_or_space, early_stopping=sweep.EarlyStopping(...))`
  to stop hopeless points early on their validation accuracy (ASHA or the
  median rule).

`validate_sweep` applies every point to a copy of the config and checks it
(known keys, matching types, `config_lib.validate`) before anything runs.
Running the points on Ray is `sweep_run`'s job; the tables are
`sweep_results`'.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
from scipy.stats import qmc

from mnist_jax import config_lib
from mnist_jax.errors import ConfigError

Point = dict[str, Any]

# Scalars only: a point's values become directory names and table cells.
_SCALARS = (bool, int, float, str)
_MAX_NAME = 180  # Leaves room under the usual 255-byte file name limit.


# ------------------------------------------------------------ definitions

def _axes(axes: Mapping[str, Sequence[Any]] | None,
          kwargs: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
  """Merges a dict of axes (dotted keys allowed) with keyword axes."""
  merged = dict(axes or {})
  for key, values in kwargs.items():
    if key in merged:
      raise ConfigError(f'Sweep axis {key!r} is given twice.')
    merged[key] = values
  out = {}
  for key, values in merged.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise ConfigError(
          f'Sweep axis {key!r} must be a list of values, got {values!r}.')
    out[key] = list(values)
  return out


def product(axes: Mapping[str, Sequence[Any]] | None = None, /,
            **kwargs: Sequence[Any]) -> list[Point]:
  """Every combination of the axes' values (a grid), first axis slowest.

  Args:
    axes: {dotted key: values}; dotted keys such as 'data.num_validation' can
      only be given this way.
    **kwargs: more axes for top-level keys, after those of `axes`.

  Returns:
    One override dict per combination, keys in axis order.
  """
  named = _axes(axes, kwargs)
  return [dict(zip(named, values))
          for values in itertools.product(*named.values())]


def zipped(axes: Mapping[str, Sequence[Any]] | None = None, /,
           **kwargs: Sequence[Any]) -> list[Point]:
  """The axes' values taken together, i-th with i-th; lengths must match."""
  named = _axes(axes, kwargs)
  lengths = {key: len(values) for key, values in named.items()}
  if len(set(lengths.values())) > 1:
    raise ConfigError(f'zipped() needs axes of equal length, got {lengths}.')
  return [dict(zip(named, values)) for values in zip(*named.values())]


def cross(*sweeps: Sequence[Point]) -> list[Point]:
  """Every combination of points of several sweeps, merged (e.g. a zip of
  learning rate and decay crossed with a product over batch sizes)."""
  points = []
  for parts in itertools.product(*sweeps):
    point: Point = {}
    for part in parts:
      for key in part:
        if key in point:
          raise ConfigError(f'cross(): key {key!r} is set by two sweeps.')
      point.update(part)
    points.append(point)
  return points


# ------------------------------------------------------------ search spaces

@dataclasses.dataclass(frozen=True)
class Distribution:
  """Values of one axis of a search space; see `uniform` and friends.

  A sample is drawn from a number `u` in [0, 1): `low + u * (high - low)`
  (on a log scale if `log`), rounded to an int if `integer`, or
  `values[int(u * len(values))]` for a choice.
  """
  low: float = 0.0
  high: float = 1.0
  log: bool = False
  integer: bool = False
  values: tuple[Any, ...] = ()

  def sample(self, u: float) -> Any:
    if self.values:
      return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
    if self.integer:  # low..high inclusive, each equally likely
      return int(min(self.low + math.floor(u * (self.high - self.low + 1)),
                     self.high))
    if self.log:
      value = math.exp(math.log(self.low)
                       + u * (math.log(self.high) - math.log(self.low)))
    else:
      value = self.low + u * (self.high - self.low)
    return float(f'{value:.3g}')  # Short names; 3 digits are plenty.


def uniform(low: float, high: float) -> Distribution:
  """Floats uniform in [low, high), rounded to 3 significant digits."""
  return _checked(Distribution(float(low), float(high)))


def loguniform(low: float, high: float) -> Distribution:
  """Floats uniform on a log scale in [low, high) (learning rates)."""
  return _checked(Distribution(float(low), float(high), log=True))


def randint(low: int, high: int) -> Distribution:
  """Integers from low to high, both included."""
  return _checked(Distribution(low, high, integer=True))


def choice(values: Sequence[Any]) -> Distribution:
  """One of `values`, each equally likely."""
  if isinstance(values, (str, bytes)) or not values:
    raise ConfigError(f'choice() needs a non-empty list, got {values!r}.')
  return Distribution(values=tuple(values))


def _checked(d: Distribution) -> Distribution:
  empty = d.low > d.high if d.integer else d.low >= d.high
  if empty:
    raise ConfigError(f'Search range [{d.low}, {d.high}] is empty.')
  if d.log and d.low <= 0:
    raise ConfigError(f'loguniform() needs low > 0, got {d.low}.')
  if d.integer and not all(isinstance(v, int) for v in (d.low, d.high)):
    raise ConfigError(f'randint() needs ints, got {d.low!r}, {d.high!r}.')
  return d


@dataclasses.dataclass(frozen=True)
class Random:
  """A search space sampled `num_samples` times.

  Attributes:
    axes: {dotted config key: `Distribution` or a fixed list (a choice)}.
    num_samples: how many points.
    seed: the samples are a pure function of it: re-running a sweep finds
      the same points, so it resumes them.
    quasi: scrambled Halton points, which cover the space more evenly than
      independent random draws; False draws independently.
  """
  axes: Mapping[str, Distribution | Sequence[Any]]
  num_samples: int
  seed: int = 0
  quasi: bool = True

  def points(self) -> list[Point]:
    """The samples, in draw order, as points (keys in axis order)."""
    if not isinstance(self.num_samples, int) or self.num_samples < 1:
      raise ConfigError(f'Random(num_samples={self.num_samples!r}): must be '
                        'a positive integer.')
    if not self.axes:
      raise ConfigError('Random() needs at least one axis.')
    axes = {k: v if isinstance(v, Distribution) else choice(v)
            for k, v in self.axes.items()}
    if self.quasi:
      u = qmc.Halton(d=len(axes), scramble=True,
                     seed=self.seed).random(self.num_samples)
    else:
      u = np.random.default_rng(self.seed).random((self.num_samples,
                                                   len(axes)))
    return [{k: d.sample(float(x)) for (k, d), x in zip(axes.items(), row)}
            for row in u]


# ---------------------------------------------------------- early stopping

EARLY_STOPPING_RULES = ('asha', 'median')


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stops points whose validation accuracy lags (never the test accuracy).

  Attributes:
    rule: 'asha' (asynchronous successive halving: at epochs grace_epochs,
      grace_epochs * reduction_factor, ... only the best 1/reduction_factor
      of the points that got there go on) or 'median' (a point stops when
      its best so far is below the median of the others' at that epoch).
    grace_epochs: every point trains at least this many epochs.
    reduction_factor: ASHA's halving rate.
    min_samples: the median rule compares only once this many points have
      reached an epoch.
  """
  rule: str = 'asha'
  grace_epochs: int = 1
  reduction_factor: int = 3
  min_samples: int = 3

  def validate(self) -> None:
    if self.rule not in EARLY_STOPPING_RULES:
      raise ConfigError(f'EarlyStopping(rule={self.rule!r}): use one of '
                        f'{", ".join(EARLY_STOPPING_RULES)}.')
    for field, least in (('grace_epochs', 1), ('reduction_factor', 2),
                         ('min_samples', 1)):
      value = getattr(self, field)
      if not isinstance(value, int) or value < least:
        raise ConfigError(f'EarlyStopping({field}={value!r}): must be an '
                          f'integer >= {least}.')


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What `get_sweep()` may return to add early stopping to its points."""
  points: Sequence[Point] | Random
  early_stopping: EarlyStopping | None = None


def as_sweep(obj: Any) -> Sweep:
  """A `Sweep` of concrete points from what `get_sweep()` returned."""
  if not isinstance(obj, Sweep):
    obj = Sweep(obj)
  points = obj.points.points() if isinstance(obj.points, Random) else obj.points
  if obj.early_stopping is not None:
    if not isinstance(obj.early_stopping, EarlyStopping):
      raise ConfigError('Sweep(early_stopping=...) must be an EarlyStopping, '
                        f'got {obj.early_stopping!r}.')
    obj.early_stopping.validate()
  return Sweep(points, obj.early_stopping)


# ------------------------------------------------------- names and loading

def _format_value(value: Any) -> str:
  if isinstance(value, float):
    return repr(value)  # Shortest exact form: 0.003, 1e-05.
  return str(value)


def point_name(point: Mapping[str, Any]) -> str:
  """The sub-workdir name of a point: `k=v` in point order, joined by ','.

  Characters that are unsafe in file names become '_'; an over-long name is
  cut and suffixed with a hash of the full one so names stay unique.
  """
  name = ','.join(f'{k}={_format_value(v)}' for k, v in point.items())
  name = re.sub(r'[^A-Za-z0-9._=,+-]', '_', name) or 'base'
  if name in ('.', '..'):
    name = f'_{name}'
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f'{name[:_MAX_NAME - 11]}~{digest}'
  return name


def load_sweep(config_filename: str) -> Sweep:
  """Calls `get_sweep([arg])` of a config file given as 'path[:arg]'; its
  search space, if any, is sampled into points (see `as_sweep`)."""
  path, _, arg = config_filename.partition(':')
  spec = importlib.util.spec_from_file_location('_sweep_config', path)
  if spec is None or not os.path.exists(path):
    raise ConfigError(f'Config file {path!r} not found.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  get_sweep = getattr(module, 'get_sweep', None)
  if get_sweep is None:
    raise ConfigError(
        f'{path} defines no get_sweep(); --sweep needs a config file with a '
        'sweep, e.g. configs/sweep_lr.py.')
  try:  # (inspect.signature: whether it takes the ':arg'; not its errors)
    inspect.signature(get_sweep).bind(*([arg] if arg else []))
  except TypeError:
    takes = 'takes one' if not arg else 'takes none'
    raise ConfigError(
        f'get_sweep() in {path} {takes} (the :arg after the file name): '
        + (f'give it as --config={path}:<arg>.' if not arg else
           f'drop ":{arg}" or add a parameter to get_sweep.')) from None
  return as_sweep(get_sweep(arg) if arg else get_sweep())


# -------------------------------------------------------------- validation

def _type_error(old: Any, new: Any) -> str | None:
  """Why `new` cannot replace `old` in a config, or None if it can."""
  if old is None:
    return None
  if not isinstance(new, _SCALARS):
    return f'sweep values must be bool, int, float or str, not {type(new).__name__}'
  # bool is an int to Python and to ConfigDict; in a config they differ.
  if isinstance(old, bool) != isinstance(new, bool):
    return f'expects {type(old).__name__}, got {type(new).__name__} {new!r}'
  if isinstance(old, float) and isinstance(new, int):
    return None
  if not isinstance(new, type(old)):
    return f'expects {type(old).__name__}, got {type(new).__name__} {new!r}'
  return None


def apply_point(config: ml_collections.ConfigDict,
                point: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's overrides; ConfigError if a key is
  unknown or a value has the wrong type (the message names key and fix)."""
  new = config.copy_and_resolve_references()
  for key, value in point.items():
    node = new
    parts = key.split('.')
    for depth, part in enumerate(parts):
      fields = list(node.keys()) if isinstance(
          node, ml_collections.ConfigDict) else []
      if part not in fields:
        where = '.'.join(parts[:depth]) or 'the config'
        close = difflib.get_close_matches(part, fields, n=1)
        hint = f'; did you mean {close[0]!r}?' if close else ''
        raise ConfigError(f'unknown config key {key!r} (no {part!r} in '
                          f'{where}){hint}')
      if depth < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f'{key!r} is a group of fields; sweep its fields, '
                        f'e.g. {key}.{next(iter(old.keys()))}.')
    why = _type_error(old, value)
    if why:
      raise ConfigError(f'config.{key} {why}.')
    with node.unlocked():
      node[parts[-1]] = value
  return new


def validate_sweep(config: ml_collections.ConfigDict,
                   points: Sequence[Mapping[str, Any]]
                   ) -> list[tuple[str, Point, ml_collections.ConfigDict]]:
  """Checks every point of a sweep against `config` before anything runs.

  Args:
    config: the base config (with the command line's overrides applied).
    points: the sweep, a list of override dicts with dotted keys.

  Returns:
    [(sub-workdir name, point, the point's config)] in sweep order.

  Raises:
    ConfigError: the sweep is empty or malformed, a key is unknown, a value
      has the wrong type or fails `config_lib.validate`, or two points
      train the same config; the message names the point. (Different
      configs whose names collide get a hash after the second one's name.)
  """
  if isinstance(points, Mapping) or not isinstance(points, Sequence):
    raise ConfigError('get_sweep() must return a list of override dicts, got '
                      f'{type(points).__name__}.')
  if not points:
    raise ConfigError('The sweep has no points.')
  out, seen, names = [], {}, set()  # seen: {config as JSON: its index}
  for i, point in enumerate(points):
    label = f'Sweep point {i + 1}/{len(points)}'
    if not isinstance(point, Mapping):
      raise ConfigError(f'{label} is {point!r}; points must be dicts of '
                        'overrides, e.g. {"batch_size": 256}.')
    point = dict(point)
    name = point_name(point)
    label += f' ({name})'
    try:
      point_config = apply_point(config, point)
      config_lib.validate(point_config)
      if point_config.data.num_validation == 0:
        raise ConfigError('config.data.num_validation=0: a sweep ranks its '
                          'points (and stops them early) on validation '
                          'accuracy; keep a validation set (e.g. 5000).')
    except ConfigError as e:
      raise ConfigError(f'{label}: {e}') from None
    trains = json.dumps(point_config.to_dict(), sort_keys=True, default=str)
    if trains in seen:
      raise ConfigError(f'{label} trains the same config as point '
                        f'{seen[trains] + 1}; remove the duplicate (a random '
                        'search: fewer num_samples, or a wider space).')
    seen[trains] = i
    if name in names:  # different configs, one folder name (e.g. a/b, a_b)
      name = f'{name}~{hashlib.sha1(trains.encode()).hexdigest()[:8]}'
    names.add(name)
    out.append((name, point, point_config))
  return out
